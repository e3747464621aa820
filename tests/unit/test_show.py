"""show.py against what ``bst show --format`` (BuildStream 2.8.1) printed.

CAPTURED is the output of tests/format_projects/show/capture.py on the project
next to it: (format, --deps, targets) -> bst's stdout without click's newline.
The fake elements below hold that project's data; their variables, environment,
config and public data are read back from bst's own YAML with PyYAML's
BaseLoader (every scalar a string), so the YAML tests are round trips through
an independent parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from pipeline.elements.show import (
    bst_dependency_order,
    dump_yaml,
    format_element,
    format_report,
    select_elements,
)

# fmt: off
CAPTURED: dict[tuple[str, str, tuple[str, ...]], str] = {
    ('%{config}', 'none', ('app.bst',)): (
        'configure-commands:\n'
        '- "export NOCONFIGURE=1;\\n\\nif [ -x ./configure ]; then true;\\neli'
        'f [ -x ./autogen ]; then ./autogen;\\nelif [ -x ./autogen.sh ]; the'
        'n ./autogen.sh;\\nelif [ -x ./bootstrap ]; then ./bootstrap;\\nelif '
        '[ -x ./bootstrap.sh ]; then ./bootstrap.sh;\\nelse autoreconf -ivf '
        '.;\\nfi"\n'
        '- "./configure --prefix=/usr \\\\\\n--exec-prefix=/usr \\\\\\n--bindir=/'
        'usr/bin \\\\\\n--sbindir=/usr/sbin \\\\\\n--sysconfdir=/etc \\\\\\n--d'
        'atadir=/usr/share \\\\\\n--includedir=/usr/include \\\\\\n--libdir=/usr/'
        'lib \\\\\\n--libexecdir=/usr/libexec \\\\\\n--localstatedir=/var \\\\'
        '\\n--sharedstatedir=/usr/com \\\\\\n--mandir=/usr/share/man \\\\\\n--info'
        'dir=/usr/share/info  "\n'
        'build-commands:\n'
        "- 'make '\n"
        'install-commands:\n'
        '- make -j1  DESTDIR="/buildstream-install" install\n'
        '- "if false || false; then\\n  find \\"/buildstream-install\\" -name '
        '\\"*.la\\" -print0 | while read -d \'\' -r file; do\\n    if grep \'^sho'
        'uldnotlink=yes$\' \\"${file}\\" &>/dev/null; then\\n      if false; th'
        'en\\n        echo \\"Removing ${file}.\\"\\n        rm \\"${file}\\"\\n  '
        '    else\\n        echo \\"Not removing ${file}.\\"\\n      fi\\n    el'
        'se\\n      if false; then\\n        echo \\"Removing ${file}.\\"\\n    '
        '    rm \\"${file}\\"\\n      else\\n        echo \\"Not removing ${file'
        '}.\\"\\n      fi\\n    fi\\n  done\\nfi"\n'
        'strip-commands:\n'
        '- \n'
    ),
    ('%{config}', 'none', ('base.bst',)): (
        'source: /\n'
        'target: /\n'
    ),
    ('%{config}', 'none', ('extra.bst',)): (
        '{}\n'
    ),
    ('%{config}', 'none', ('lib.bst',)): (
        'configure-commands: []\n'
        'build-commands:\n'
        '- make -j1 PREFIX="/usr"\n'
        '- "echo one\\necho two"\n'
        'install-commands:\n'
        '- make DESTDIR="/buildstream-install" install\n'
        'strip-commands:\n'
        '- \n'
    ),
    ('%{env}', 'none', ('app.bst',)): (
        'PATH: /usr/bin:/bin:/usr/sbin:/sbin\n'
        'SHELL: /bin/sh\n'
        'TERM: dumb\n'
        'USER: tomjon\n'
        'USERNAME: tomjon\n'
        'LOGNAME: tomjon\n'
        'LC_ALL: C\n'
        'HOME: /tmp\n'
        'TZ: UTC\n'
        'SOURCE_DATE_EPOCH: 1321009871\n'
        'MAKEFLAGS: -j2\n'
        'V: 1\n'
    ),
    ('%{env}', 'none', ('base.bst',)): (
        'PATH: /usr/bin:/bin:/usr/sbin:/sbin\n'
        'SHELL: /bin/sh\n'
        'TERM: dumb\n'
        'USER: tomjon\n'
        'USERNAME: tomjon\n'
        'LOGNAME: tomjon\n'
        'LC_ALL: C\n'
        'HOME: /tmp\n'
        'TZ: UTC\n'
        'SOURCE_DATE_EPOCH: 1321009871\n'
    ),
    ('%{env}', 'none', ('extra.bst',)): (
        'PATH: /usr/bin:/bin:/usr/sbin:/sbin\n'
        'SHELL: /bin/sh\n'
        'TERM: dumb\n'
        'USER: tomjon\n'
        'USERNAME: tomjon\n'
        'LOGNAME: tomjon\n'
        'LC_ALL: C\n'
        'HOME: /tmp\n'
        'TZ: UTC\n'
        'SOURCE_DATE_EPOCH: 1321009871\n'
    ),
    ('%{env}', 'none', ('lib.bst',)): (
        'PATH: /usr/bin:/bin:/usr/sbin:/sbin\n'
        'SHELL: /bin/sh\n'
        'TERM: dumb\n'
        'USER: tomjon\n'
        'USERNAME: tomjon\n'
        'LOGNAME: tomjon\n'
        'LC_ALL: C\n'
        'HOME: /tmp\n'
        'TZ: UTC\n'
        'SOURCE_DATE_EPOCH: 1321009871\n'
        'CFLAGS: -O2 -g\n'
        'NUMBER: 7\n'
    ),
    ('%{name}', 'all', ('app.bst',)): (
        'base.bst\n'
        'lib.bst\n'
        'extra.bst\n'
        'app.bst'
    ),
    ('%{name}', 'all', ('extra.bst', 'lib.bst')): (
        'base.bst\n'
        'extra.bst\n'
        'lib.bst'
    ),
    ('%{name}', 'build', ('app.bst',)): (
        'base.bst\n'
        'lib.bst'
    ),
    ('%{name}', 'build', ('app.bst', 'extra.bst')): (
        'base.bst\n'
        'lib.bst'
    ),
    ('%{name}', 'none', ('app.bst',)): (
        'app.bst'
    ),
    ('%{name}', 'run', ('app.bst',)): (
        'lib.bst\n'
        'base.bst\n'
        'extra.bst\n'
        'app.bst'
    ),
    ('%{name}', 'run', ('app.bst', 'lib.bst')): (
        'lib.bst\n'
        'base.bst\n'
        'extra.bst\n'
        'app.bst'
    ),
    ('%{name}: %{deps}', 'all', ('order.bst',)): (
        'zlib.bst: []\n'
        'alpha.bst: - zlib.bst\n'
        'mmm.bst: []\n'
        'aaa-run.bst: []\n'
        'order.bst: - alpha.bst\n'
        '- mmm.bst\n'
        '- zlib.bst\n'
        '- aaa-run.bst'
    ),
    ('%{name}|%{key}|%{full-key}|%{kind}', 'all', ('app.bst',)): (
        'base.bst|c9334b4e|c9334b4e13c7189bdddb39c3b3933aa9d20bd15dee2691b7'
        '00d91eec0c7a6c86|import\n'
        'lib.bst|6df11685|6df11685ccb1cead06f9d5c288bb4f9c290ec1d72eb275604'
        'd0847ad9ea737fe|manual\n'
        'extra.bst|c9245730|c924573024210f4e12a5efca7c85fe474261d33b07819aa'
        '7811e34d13858c65e|stack\n'
        'app.bst|e355c1de|e355c1dea80307c5e5286dee5ad65eb8e97ef00ea28435637'
        '8733f96a08e2fe1|autotools'
    ),
    ('%{public}', 'none', ('app.bst',)): (
        'bst:\n'
        '  split-rules:\n'
        '    runtime:\n'
        '    - /usr/bin\n'
        '    - /usr/bin/*\n'
        '    - /usr/sbin\n'
        '    - /usr/sbin/*\n'
        '    - /usr/libexec\n'
        '    - /usr/libexec/*\n'
        '    - /usr/lib/lib*.so*\n'
        '    devel:\n'
        '    - /usr/include\n'
        '    - /usr/include/**\n'
        '    - /usr/lib/lib*.a\n'
        '    - /usr/lib/lib*.la\n'
        '    - /usr/lib/pkgconfig/*.pc\n'
        '    - /usr/share/pkgconfig/*.pc\n'
        '    - /usr/share/aclocal/*.m4\n'
        '    debug:\n'
        '    - /usr/lib/debug\n'
        '    - /usr/lib/debug/**\n'
        '    doc:\n'
        '    - /usr/share/doc\n'
        '    - /usr/share/doc/**\n'
        '    - /usr/share/info\n'
        '    - /usr/share/info/**\n'
        '    - /usr/share/man\n'
        '    - /usr/share/man/**\n'
        '    locale:\n'
        '    - /usr/share/locale\n'
        '    - /usr/share/locale/**\n'
        '    - /usr/share/i18n\n'
        '    - /usr/share/i18n/**\n'
        '    - /usr/share/zoneinfo\n'
        '    - /usr/share/zoneinfo/**\n'
    ),
    ('%{public}', 'none', ('base.bst',)): (
        'bst:\n'
        '  split-rules:\n'
        '    runtime:\n'
        '    - /usr/bin\n'
        '    - /usr/bin/*\n'
        '    - /usr/sbin\n'
        '    - /usr/sbin/*\n'
        '    - /usr/libexec\n'
        '    - /usr/libexec/*\n'
        '    - /usr/lib/lib*.so*\n'
        '    devel:\n'
        '    - /usr/include\n'
        '    - /usr/include/**\n'
        '    - /usr/lib/lib*.a\n'
        '    - /usr/lib/lib*.la\n'
        '    - /usr/lib/pkgconfig/*.pc\n'
        '    - /usr/share/pkgconfig/*.pc\n'
        '    - /usr/share/aclocal/*.m4\n'
        '    debug:\n'
        '    - /usr/lib/debug\n'
        '    - /usr/lib/debug/**\n'
        '    doc:\n'
        '    - /usr/share/doc\n'
        '    - /usr/share/doc/**\n'
        '    - /usr/share/info\n'
        '    - /usr/share/info/**\n'
        '    - /usr/share/man\n'
        '    - /usr/share/man/**\n'
        '    locale:\n'
        '    - /usr/share/locale\n'
        '    - /usr/share/locale/**\n'
        '    - /usr/share/i18n\n'
        '    - /usr/share/i18n/**\n'
        '    - /usr/share/zoneinfo\n'
        '    - /usr/share/zoneinfo/**\n'
    ),
    ('%{public}', 'none', ('extra.bst',)): (
        'bst:\n'
        '  split-rules:\n'
        '    runtime:\n'
        '    - /usr/bin\n'
        '    - /usr/bin/*\n'
        '    - /usr/sbin\n'
        '    - /usr/sbin/*\n'
        '    - /usr/libexec\n'
        '    - /usr/libexec/*\n'
        '    - /usr/lib/lib*.so*\n'
        '    devel:\n'
        '    - /usr/include\n'
        '    - /usr/include/**\n'
        '    - /usr/lib/lib*.a\n'
        '    - /usr/lib/lib*.la\n'
        '    - /usr/lib/pkgconfig/*.pc\n'
        '    - /usr/share/pkgconfig/*.pc\n'
        '    - /usr/share/aclocal/*.m4\n'
        '    debug:\n'
        '    - /usr/lib/debug\n'
        '    - /usr/lib/debug/**\n'
        '    doc:\n'
        '    - /usr/share/doc\n'
        '    - /usr/share/doc/**\n'
        '    - /usr/share/info\n'
        '    - /usr/share/info/**\n'
        '    - /usr/share/man\n'
        '    - /usr/share/man/**\n'
        '    locale:\n'
        '    - /usr/share/locale\n'
        '    - /usr/share/locale/**\n'
        '    - /usr/share/i18n\n'
        '    - /usr/share/i18n/**\n'
        '    - /usr/share/zoneinfo\n'
        '    - /usr/share/zoneinfo/**\n'
    ),
    ('%{public}', 'none', ('lib.bst',)): (
        'bst:\n'
        '  integration-commands:\n'
        '  - ldconfig\n'
        '  split-rules:\n'
        '    runtime:\n'
        '    - /usr/bin\n'
        '    - /usr/bin/*\n'
        '    - /usr/sbin\n'
        '    - /usr/sbin/*\n'
        '    - /usr/libexec\n'
        '    - /usr/libexec/*\n'
        '    - /usr/lib/lib*.so*\n'
        '    devel:\n'
        '    - /usr/include\n'
        '    - /usr/include/**\n'
        '    - /usr/lib/lib*.a\n'
        '    - /usr/lib/lib*.la\n'
        '    - /usr/lib/pkgconfig/*.pc\n'
        '    - /usr/share/pkgconfig/*.pc\n'
        '    - /usr/share/aclocal/*.m4\n'
        '    - /usr/include/extra/**\n'
        '    debug:\n'
        '    - /usr/lib/debug\n'
        '    - /usr/lib/debug/**\n'
        '    doc:\n'
        '    - /usr/share/doc\n'
        '    - /usr/share/doc/**\n'
        '    - /usr/share/info\n'
        '    - /usr/share/info/**\n'
        '    - /usr/share/man\n'
        '    - /usr/share/man/**\n'
        '    locale:\n'
        '    - /usr/share/locale\n'
        '    - /usr/share/locale/**\n'
        '    - /usr/share/i18n\n'
        '    - /usr/share/i18n/**\n'
        '    - /usr/share/zoneinfo\n'
        '    - /usr/share/zoneinfo/**\n'
        'custom:\n'
        '  key: value\n'
        '  list:\n'
        '  - a\n'
        '  - b\n'
    ),
    ('%{vars}', 'none', ('app.bst',)): (
        'prefix: /usr\n'
        'exec_prefix: /usr\n'
        'bindir: /usr/bin\n'
        'sbindir: /usr/sbin\n'
        'libexecdir: /usr/libexec\n'
        'datadir: /usr/share\n'
        'sysconfdir: /etc\n'
        'sharedstatedir: /usr/com\n'
        'localstatedir: /var\n'
        'lib: lib\n'
        'libdir: /usr/lib\n'
        'debugdir: /usr/lib/debug\n'
        'includedir: /usr/include\n'
        'docdir: /usr/share/doc\n'
        'infodir: /usr/share/info\n'
        'mandir: /usr/share/man\n'
        'build-root: /buildstream/showcase/app.bst\n'
        'conf-root: .\n'
        'install-root: /buildstream-install\n'
        'strip-binaries:\n'
        'answer: 42\n'
        'flag: yes\n'
        'empty:\n'
        'project-name: showcase\n'
        'max-jobs: 2\n'
        'autogen: "export NOCONFIGURE=1;\\n\\nif [ -x ./configure ]; then tru'
        'e;\\nelif [ -x ./autogen ]; then ./autogen;\\nelif [ -x ./autogen.sh'
        ' ]; then ./autogen.sh;\\nelif [ -x ./bootstrap ]; then ./bootstrap;'
        '\\nelif [ -x ./bootstrap.sh ]; then ./bootstrap.sh;\\nelse autorecon'
        'f -ivf .;\\nfi"\n'
        'conf-global:\n'
        'conf-local:\n'
        'conf-cmd: ./configure\n'
        'conf-args: "--prefix=/usr \\\\\\n--exec-prefix=/usr \\\\\\n--bindir=/usr'
        '/bin \\\\\\n--sbindir=/usr/sbin \\\\\\n--sysconfdir=/etc \\\\\\n--data'
        'dir=/usr/share \\\\\\n--includedir=/usr/include \\\\\\n--libdir=/usr/lib'
        ' \\\\\\n--libexecdir=/usr/libexec \\\\\\n--localstatedir=/var \\\\\\n-'
        '-sharedstatedir=/usr/com \\\\\\n--mandir=/usr/share/man \\\\\\n--infodir'
        '=/usr/share/info  "\n'
        'configure: "./configure --prefix=/usr \\\\\\n--exec-prefix=/usr \\\\\\n-'
        '-bindir=/usr/bin \\\\\\n--sbindir=/usr/sbin \\\\\\n--sysconfdir=/et'
        'c \\\\\\n--datadir=/usr/share \\\\\\n--includedir=/usr/include \\\\\\n'
        '--libdir=/usr/lib \\\\\\n--libexecdir=/usr/libexec \\\\\\n--localstatedi'
        'r=/var \\\\\\n--sharedstatedir=/usr/com \\\\\\n--mandir=/usr/share/man \\'
        '\\\\n--infodir=/usr/share/info  "\n'
        'make-args:\n'
        'make-install-args: \' DESTDIR="/buildstream-install" install\'\n'
        "make: 'make '\n"
        'make-install: make -j1  DESTDIR="/buildstream-install" install\n'
        'remove-libtool-modules: false\n'
        'remove-libtool-libraries: false\n'
        'delete-libtool-archives: "if false || false; then\\n  find \\"/build'
        'stream-install\\" -name \\"*.la\\" -print0 | while read -d \'\' -r file'
        '; do\\n    if grep \'^shouldnotlink=yes$\' \\"${file}\\" &>/dev/null; t'
        'hen\\n      if false; then\\n        echo \\"Removing ${file}.\\"\\n   '
        '     rm \\"${file}\\"\\n      else\\n        echo \\"Not removing ${fil'
        'e}.\\"\\n      fi\\n    else\\n      if false; then\\n        echo \\"Re'
        'moving ${file}.\\"\\n        rm \\"${file}\\"\\n      else\\n        ech'
        'o \\"Not removing ${file}.\\"\\n      fi\\n    fi\\n  done\\nfi"\n'
        'element-name: app.bst\n'
    ),
    ('%{vars}', 'none', ('base.bst',)): (
        'prefix: /usr\n'
        'exec_prefix: /usr\n'
        'bindir: /usr/bin\n'
        'sbindir: /usr/sbin\n'
        'libexecdir: /usr/libexec\n'
        'datadir: /usr/share\n'
        'sysconfdir: /etc\n'
        'sharedstatedir: /usr/com\n'
        'localstatedir: /var\n'
        'lib: lib\n'
        'libdir: /usr/lib\n'
        'debugdir: /usr/lib/debug\n'
        'includedir: /usr/include\n'
        'docdir: /usr/share/doc\n'
        'infodir: /usr/share/info\n'
        'mandir: /usr/share/man\n'
        'build-root: /buildstream/showcase/base.bst\n'
        'conf-root: .\n'
        'install-root: /buildstream-install\n'
        'strip-binaries:\n'
        'answer: 42\n'
        'flag: yes\n'
        'empty:\n'
        'project-name: showcase\n'
        'max-jobs: 2\n'
        'element-name: base.bst\n'
    ),
    ('%{vars}', 'none', ('extra.bst',)): (
        'prefix: /usr\n'
        'exec_prefix: /usr\n'
        'bindir: /usr/bin\n'
        'sbindir: /usr/sbin\n'
        'libexecdir: /usr/libexec\n'
        'datadir: /usr/share\n'
        'sysconfdir: /etc\n'
        'sharedstatedir: /usr/com\n'
        'localstatedir: /var\n'
        'lib: lib\n'
        'libdir: /usr/lib\n'
        'debugdir: /usr/lib/debug\n'
        'includedir: /usr/include\n'
        'docdir: /usr/share/doc\n'
        'infodir: /usr/share/info\n'
        'mandir: /usr/share/man\n'
        'build-root: /buildstream/showcase/extra.bst\n'
        'conf-root: .\n'
        'install-root: /buildstream-install\n'
        'strip-binaries:\n'
        'answer: 42\n'
        'flag: yes\n'
        'empty:\n'
        'project-name: showcase\n'
        'max-jobs: 2\n'
        'element-name: extra.bst\n'
    ),
    ('%{vars}', 'none', ('lib.bst',)): (
        'prefix: /usr\n'
        'exec_prefix: /usr\n'
        'bindir: /usr/bin\n'
        'sbindir: /usr/sbin\n'
        'libexecdir: /usr/libexec\n'
        'datadir: /usr/share\n'
        'sysconfdir: /etc\n'
        'sharedstatedir: /usr/com\n'
        'localstatedir: /var\n'
        'lib: lib\n'
        'libdir: /usr/lib\n'
        'debugdir: /usr/lib/debug\n'
        'includedir: /usr/include\n'
        'docdir: /usr/share/doc\n'
        'infodir: /usr/share/info\n'
        'mandir: /usr/share/man\n'
        'build-root: /buildstream/showcase/lib.bst\n'
        'conf-root: .\n'
        'install-root: /buildstream-install\n'
        'strip-binaries:\n'
        'answer: 42\n'
        'flag: yes\n'
        'empty:\n'
        'project-name: showcase\n'
        'max-jobs: 2\n'
        'quoted: "it\'s: a {value}"\n'
        'multi: "first line\\nsecond line"\n'
        'element-name: lib.bst\n'
    ),
    (
        '[%{name:^12}|%{name:>10}|%{key:.4}] deps=%{deps} b=%{build-deps} r=%{runtime-deps}',
        'all',
        ('app.bst',),
    ): (
        '[  base.bst  |  base.bst|c933] deps=[] b=[] r=[]\n'
        '[  lib.bst   |   lib.bst|6df1] deps=- base.bst b=- base.bst r=[]\n'
        '[ extra.bst  | extra.bst|c924] deps=- base.bst b=- base.bst r=- base.bst\n'
        '[  app.bst   |   app.bst|e355] deps=- base.bst\n'
        '- lib.bst\n'
        '- extra.bst b=- base.bst\n'
        '- lib.bst r=- lib.bst\n'
        '- extra.bst'
    ),
}
# fmt: on

KEYS = {
    "base.bst": "c9334b4e13c7189bdddb39c3b3933aa9d20bd15dee2691b700d91eec0c7a6c86",
    "lib.bst": "6df11685ccb1cead06f9d5c288bb4f9c290ec1d72eb275604d0847ad9ea737fe",
    "extra.bst": "c924573024210f4e12a5efca7c85fe474261d33b07819aa7811e34d13858c65e",
    "app.bst": "e355c1dea80307c5e5286dee5ad65eb8e97ef00ea284356378733f96a08e2fe1",
}
KINDS = {"base.bst": "import", "lib.bst": "manual", "extra.bst": "stack", "app.bst": "autotools"}


@dataclass
class FakeVariables:
    values: dict[str, str]

    def as_dict(self) -> dict[str, str]:
        return dict(self.values)


@dataclass
class FakeDependency:
    element: FakeElement
    build: bool
    runtime: bool


@dataclass(eq=False)
class FakeElement:
    name: str
    kind: str = "manual"
    cache_key: str = "0" * 64
    variables: FakeVariables = field(default_factory=lambda: FakeVariables({}))
    environment: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    public: dict[str, Any] = field(default_factory=dict)
    dependencies: list[FakeDependency] = field(default_factory=list)


def _bst_yaml(fmt: str, name: str) -> Any:
    return yaml.load(CAPTURED[(fmt, "none", (name,))], Loader=yaml.BaseLoader)


def _project() -> dict[str, FakeElement]:
    """The show project as fake elements, dependencies sorted as bst sorts them."""
    elements = {
        name: FakeElement(
            name=name,
            kind=KINDS[name],
            cache_key=KEYS[name],
            variables=FakeVariables(_bst_yaml("%{vars}", name)),
            environment=_bst_yaml("%{env}", name),
            config=_bst_yaml("%{config}", name),
            public=_bst_yaml("%{public}", name),
        )
        for name in KEYS
    }
    for name in ("zlib.bst", "alpha.bst", "aaa-run.bst", "mmm.bst", "order.bst"):
        elements[name] = FakeElement(name=name)

    def declare(name: str, deps: list[tuple[str, bool, bool]]) -> None:
        # deps as the file lists them: build-depends, runtime-depends, depends
        declared = [FakeDependency(elements[d], build=b, runtime=r) for d, b, r in deps]
        elements[name].dependencies = bst_dependency_order(declared)

    declare("lib.bst", [("base.bst", True, False)])
    declare("extra.bst", [("base.bst", True, True)])
    declare(
        "app.bst", [("base.bst", True, False), ("extra.bst", False, True), ("lib.bst", True, True)]
    )
    declare("alpha.bst", [("zlib.bst", True, True)])
    declare(
        "order.bst",
        [
            ("mmm.bst", True, False),
            ("aaa-run.bst", False, True),
            ("alpha.bst", True, True),
            ("zlib.bst", True, True),
        ],
    )
    return elements


def test_dependency_order_is_bsts_not_a_topological_sort() -> None:
    # Given order.bst, whose alpha.bst needs zlib.bst, When sorted as bst sorts,
    # Then alpha comes first: bst's sort never compares those two
    order = _project()["order.bst"]
    assert [d.element.name for d in order.dependencies] == [
        "alpha.bst", "mmm.bst", "zlib.bst", "aaa-run.bst"
    ]  # fmt: skip


def _state(element: Any) -> str:
    return "buildable" if element.name == "base.bst" else "waiting"


@pytest.mark.parametrize("case", sorted(CAPTURED), ids=lambda c: f"{c[0]}|{c[1]}|{','.join(c[2])}")
def test_report_matches_bst(case: tuple[str, str, tuple[str, ...]]) -> None:
    # Given the project's elements and a format bst was run with
    elements = _project()
    fmt, deps, targets = case
    # When remex selects and formats them
    selected = select_elements([elements[t] for t in targets], deps)  # type: ignore[arg-type]
    report = format_report(selected, fmt, _state)
    # Then the report is byte for byte bst's
    assert report == CAPTURED[case]


def test_report_keeps_trailing_newline_of_yaml() -> None:
    # Given lib.bst's environment (a value's newline is followed by click's reset code)
    lib = _project()["lib.bst"]
    # When one element is formatted
    line = format_element(lib, "%{env}", state="waiting")  # type: ignore[arg-type]
    # Then the YAML document ends with its newline
    assert line.endswith("NUMBER: 7\n")
    assert format_report([lib], "%{env}", _state) == line  # type: ignore[list-item]
    # And only newlines written in the format itself are stripped at the end
    assert format_report([lib], "%{name}\n\n", _state) == "lib.bst"  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("value", "dumped"),
    [
        ({}, "{}\n"),
        ([], "[]\n"),
        ({"a": ""}, "a:\n"),
        ({"a": [""]}, "a:\n- \n"),
        ({"n": "42", "b": "yes", "t": True, "z": None}, "n: 42\nb: yes\nt: True\nz:\n"),
        ({"q": "it's"}, "q: it's\n"),
        ({"q": "it's: x"}, 'q: "it\'s: x"\n'),
        ({"q": "a: b"}, "q: 'a: b'\n"),
        ({"q": "a:b"}, "q: a:b\n"),
        ({"q": "x #y"}, "q: 'x #y'\n"),
        ({"q": "two\nlines"}, 'q: "two\\nlines"\n'),
        ({"q": "- x"}, "q: '- x'\n"),
        ({"q": "make "}, "q: 'make '\n"),
        ({"m": {"l": ["a", {"k": "v"}]}}, "m:\n  l:\n  - a\n  - k: v\n"),
    ],
)
def test_dump_yaml_as_bst(value: Any, dumped: str) -> None:
    # Given a value, When it is dumped, Then it reads as bst's ruamel dump would
    assert dump_yaml(value) == dumped


def test_unknown_placeholders_stay_and_bad_specs_fail() -> None:
    # Given an element
    element = FakeElement(name="a.bst")
    # When a format has an unknown placeholder, Then it is left as written
    assert format_element(element, "%{name} %{nope}", state="cached") == "a.bst %{nope}"  # type: ignore[arg-type]
    # When a spec does not fit, Then the error says which placeholder
    with pytest.raises(ValueError, match="name-x"):
        format_element(element, "%{name-x}", state="cached")  # type: ignore[arg-type]


def test_select_elements_survives_a_deep_chain() -> None:
    # Given a chain deeper than Python's recursion limit
    chain = [FakeElement(name=f"e{i}.bst") for i in range(3000)]
    for parent, child in zip(chain[1:], chain, strict=False):
        parent.dependencies = [FakeDependency(child, build=True, runtime=True)]
    # When every dependency is selected
    selected = select_elements([chain[-1]], "all")  # type: ignore[list-item]
    # Then the order is leaves first
    assert [e.name for e in selected] == [e.name for e in chain]


def test_select_elements_refuses_unknown_selection() -> None:
    with pytest.raises(ValueError, match="dependency selection"):
        select_elements([], "most")  # type: ignore[arg-type]


def test_dump_yaml_agrees_with_ruamel_as_bst_configures_it() -> None:
    # Given ruamel.yaml (installed with buildstream, the local extra) set up as
    # bst's roundtrip_dump sets it up: every scalar a plain string, width 9999
    import io
    import random

    from ruamel import yaml as ruamel_yaml

    def bst_dump(value: Any) -> str:
        dumper = ruamel_yaml.YAML()
        dumper.width = 9999
        for version in [(1, 1), (1, 2), None]:
            dumper.resolver.add_version_implicit_resolver(
                version, "tag:yaml.org,2002:str", ruamel_yaml.util.RegExp(r".*"), None
            )
        out = io.StringIO()
        dumper.dump(value, out)
        return out.getvalue()

    pieces = [*"ab -:#'\"\n\t?{}[],&*!|>%@`\\$~=", "é", "😀", "\u2028", "\x85", "\x01", "---"]
    pieces += ["...", "\ufeff", "\xa0", "yes", "1.0", "null", "~"]
    rng = random.Random(15)

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth < 3 and roll < 0.2:
            return {text() or "k": value(depth + 1) for _ in range(rng.randint(0, 3))}
        if depth < 3 and roll < 0.4:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return text()

    # When random documents are dumped by both, Then the bytes agree
    for _ in range(3000):
        document = {text() or "k": value(0)} if rng.random() < 0.7 else [value(0)]
        assert dump_yaml(document) == bst_dump(document), repr(document)
