"""Write the package's machine-readable ``debian/copyright`` for wabridge and its bundled venv.

    gen_copyright.py SITE_PACKAGES > usr/share/doc/wabridge/copyright

wabridge itself is MIT (Expat). Every distribution installed in the venv gets a paragraph whose
``Files:`` are its installed paths, ``License:`` taken from its metadata (License-Expression,
else License, else the trove classifiers), normalised to DEP-5 short names, with a hand-checked
table for the few that declare nothing usable. ``Copyright:`` lines come from the
distribution's own license file, else its author fields. Libraries that wheels bundle
(``<dist>.libs/``, or statically linked, listed in ``EMBEDDED``) are named in a comment.

The Claude Code CLI that claude-agent-sdk bundles is proprietary Anthropic software and gets a
paragraph of its own; so the package as a whole is not DFSG-free.

Run with Debian's python3 (standard library only).
"""

from __future__ import annotations

import re
import sys
from email.message import Message
from importlib import metadata
from pathlib import Path

INSTALL_PREFIX = "usr/lib/wabridge/venv"
FORMAT = "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"

# SPDX / free-text license names -> DEP-5 short names.
ALIASES = {
    "mit": "Expat",
    "mit license": "Expat",
    "the mit license (mit)": "Expat",
    "apache 2.0": "Apache-2.0",
    "apache-2.0": "Apache-2.0",
    "apache license 2.0": "Apache-2.0",
    "apache license, version 2.0": "Apache-2.0",
    "apache software license": "Apache-2.0",
    "bsd-3-clause": "BSD-3-Clause",
    "3-clause bsd license": "BSD-3-Clause",
    "bsd-2-clause": "BSD-2-Clause",
    "bsd 2-clause license": "BSD-2-Clause",
    "mpl-2.0": "MPL-2.0",
    "mozilla public license 2.0 (mpl 2.0)": "MPL-2.0",
    "psf-2.0": "PSF-2.0",
    "python software foundation license": "PSF-2.0",
    "lgpl-2.1+": "LGPL-2.1+",
    "lgpl-2.1-or-later": "LGPL-2.1+",
    "mit-0": "MIT-0",
    "mit-cmu": "MIT-CMU",
}

# Distributions whose metadata is missing or ambiguous; checked against their LICENSE files
# and upstream repositories.
OVERRIDES = {
    "neonize": "Apache-2.0",  # no metadata; upstream LICENSE is Apache-2.0
    "sdnotify": "Expat",
    "segno": "BSD-3-Clause",
    "qrcode": "BSD-3-Clause",  # also carries an "Other/Proprietary" classifier by mistake
    "pyasn1-modules": "BSD-2-Clause",
    "hyperframe": "Expat",  # License: holds the whole text
    "pip": "Expat",
    "setuptools": "Expat",
}

# What some wheels link in statically or carry in <dist>.libs, as far as we can tell.
EMBEDDED = {
    "neonize": "a Go shared library (neonize-linux-amd64.so) built from neonize's Go code, "
    "go.mau.fi/whatsmeow (MPL-2.0), the Go runtime and standard library (BSD-3-Clause) and "
    "further Go modules (BSD/MIT/Apache-2.0)",
    "cryptography": "OpenSSL (Apache-2.0) and Rust crates (MIT/Apache-2.0), statically linked",
    "grpcio": "BoringSSL (ISC/OpenSSL), Abseil (Apache-2.0), c-ares (Expat), RE2 (BSD-3-Clause), "
    "upb (BSD-3-Clause) and zlib (Zlib), statically linked",
    "lxml": "libxml2 and libxslt (Expat), libiconv (LGPL-2.1+) and zlib (Zlib), statically linked",
    "aiohttp": "llhttp (Expat)",
    "pillow": "libjpeg-turbo, libpng, libtiff, libwebp, openjpeg, freetype, harfbuzz, lcms2, "
    "brotli, xz, zlib and others (each under its own free license, see pillow's LICENSE)",
    "pydantic-core": "Rust crates (MIT/Apache-2.0)",
    "rpds-py": "Rust crates (MIT/Apache-2.0)",
    "cffi": "libffi (Expat)",
}

GENERIC_TEXTS = {
    "Expat": """\
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the "Software"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
 THE SOFTWARE.""",
    "MIT-0": """\
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the "Software"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
 SOFTWARE.""",
    "BSD-2-Clause": """\
 Redistribution and use in source and binary forms, with or without
 modification, are permitted provided that the following conditions are met:
 .
 1. Redistributions of source code must retain the above copyright notice,
    this list of conditions and the following disclaimer.
 2. Redistributions in binary form must reproduce the above copyright notice,
    this list of conditions and the following disclaimer in the documentation
    and/or other materials provided with the distribution.
 .
 THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
 AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
 IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE
 ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE
 LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR
 CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
 SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS
 INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN
 CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE)
 ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
 POSSIBILITY OF SUCH DAMAGE.""",
    "BSD-3-Clause": """\
 Redistribution and use in source and binary forms, with or without
 modification, are permitted provided that the following conditions are met:
 .
 1. Redistributions of source code must retain the above copyright notice,
    this list of conditions and the following disclaimer.
 2. Redistributions in binary form must reproduce the above copyright notice,
    this list of conditions and the following disclaimer in the documentation
    and/or other materials provided with the distribution.
 3. Neither the name of the copyright holder nor the names of its
    contributors may be used to endorse or promote products derived from this
    software without specific prior written permission.
 .
 THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
 AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
 IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE
 ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE
 LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR
 CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
 SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS
 INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN
 CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE)
 ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
 POSSIBILITY OF SUCH DAMAGE.""",
}
COMMON_LICENSES = {
    "Apache-2.0": "Apache-2.0",
    "MPL-2.0": "MPL-2.0",
    "LGPL-2.1+": "LGPL-2.1",
}

PROPRIETARY = "Anthropic-proprietary"
PROPRIETARY_TEXT = """\
 Claude Code is proprietary software of Anthropic PBC. All rights reserved.
 It is not free software: it may not be modified or redistributed except as
 Anthropic permits, and its use is subject to Anthropic's Commercial Terms of
 Service (https://www.anthropic.com/legal/commercial-terms) or, for consumer
 accounts, Anthropic's Consumer Terms of Service
 (https://www.anthropic.com/legal/consumer-terms). claude-agent-sdk ships this
 binary inside its wheel; wabridge redistributes that wheel unchanged."""


def normalise(expr: str) -> str:
    """An SPDX expression or free-text name -> a DEP-5 license expression."""
    parts = re.split(r"\s+(AND|OR|and|or)\s+", expr.strip().strip("()"))
    out = []
    for part in parts:
        low = part.lower()
        if low in ("and", "or"):
            out.append(low)
        else:
            out.append(ALIASES.get(low.strip("()"), part.strip("()")))
    return " ".join(out)


def license_of(dist: metadata.Distribution) -> str:
    meta: Message = dist.metadata  # type: ignore[assignment]
    name = canonical(meta["Name"])
    if name in OVERRIDES:
        return OVERRIDES[name]
    if meta.get("License-Expression"):
        return normalise(meta["License-Expression"])
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) < 60:
        return normalise(text)
    classifiers = [
        c.rsplit("::", 1)[1].strip()
        for c in meta.get_all("Classifier") or []
        if c.startswith("License :: OSI Approved ::")
    ]
    if classifiers:
        return " or ".join(dict.fromkeys(normalise(c) for c in classifiers))
    return "unknown"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def license_files(dist: metadata.Distribution) -> list[Path]:
    found = []
    for f in dist.files or []:
        p = Path(str(f))
        if ".dist-info" in str(p.parent) and re.match(r"(?i)(licen[cs]e|copying|notice)", p.name):
            found.append(Path(str(dist.locate_file(f))))
    # the distribution's own license first (dist-info/LICENSE, licenses/LICENSE), then vendored
    return sorted(found, key=lambda p: (len(p.parts), p.name))


def copyrights(dist: metadata.Distribution) -> list[str]:
    lines: list[str] = []
    for path in license_files(dist):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines()[:400]:
            s = line.strip().strip("#*").strip()
            if re.match(r"(?i)^(copyright\s*(\(c\)|©|\d)|\(c\)\s*\d|©)", s) and len(s) < 120:
                s = re.sub(r"(?i)^copyright\s*", "", s)
                if s not in lines:
                    lines.append(s)
            if len(lines) >= 4:
                break
    if lines:
        return lines
    meta: Message = dist.metadata  # type: ignore[assignment]
    for key in ("Author", "Author-email", "Maintainer", "Maintainer-email"):
        value = (meta.get(key) or "").strip()
        if value and value.upper() != "UNKNOWN":
            return [value.replace("\n", " ")]
    return [f"the {meta['Name']} authors"]


def dir_prefixes(dist: metadata.Distribution) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        for depth in range(1, len(parts)):
            out.add(parts[:depth])
    return out


def files_of(
    dist: metadata.Distribution, site: Path, shared: set[tuple[str, ...]]
) -> list[str]:
    """Installed paths of a distribution, as DEP-5 patterns (directories, single files).

    A directory that several distributions install into (a namespace package such as
    ``google/`` or ``google/cloud/``) is split deeper, so each pattern names the files of one
    distribution only.
    """
    prefix = f"{INSTALL_PREFIX}/{site.relative_to(site.parents[2])}"
    tops: list[str] = []
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts[0] == ".." or "__pycache__" in parts:
            continue
        depth = 1
        while depth < len(parts) and parts[:depth] in shared:
            depth += 1
        if not (site / Path(*parts[:depth])).exists():
            continue  # removed after install (pip's own, a .gitignore)
        name = "/".join(parts[:depth])
        top = f"{prefix}/{name}/*" if len(parts) > depth else f"{prefix}/{name}"
        if top not in tops:
            tops.append(top)
    return sorted(tops)


def paragraph(fields: list[tuple[str, str | list[str]]]) -> str:
    out = []
    for key, value in fields:
        if isinstance(value, list):
            out.append(f"{key}: {value[0]}" + "".join(f"\n {v}" for v in value[1:]))
        else:
            out.append(f"{key}: {value}")
    return "\n".join(out)


def main(site_dir: str) -> str:
    site = Path(site_dir).resolve()
    dists = sorted(
        metadata.distributions(path=[str(site)]), key=lambda d: canonical(d.metadata["Name"])
    )
    used: set[str] = {"Expat", PROPRIETARY}
    seen: dict[tuple[str, ...], int] = {}
    for dist in dists:
        for top in dir_prefixes(dist):
            seen[top] = seen.get(top, 0) + 1
    shared = {top for top, count in seen.items() if count > 1}
    paras = [
        paragraph(
            [
                ("Format", FORMAT),
                ("Upstream-Name", "wabridge"),
                (
                    "Comment",
                    [
                        "wabridge is MIT (Expat) licensed. The package bundles a Python",
                        "virtual environment (/usr/lib/wabridge/venv) of its locked",
                        "dependencies, listed below with their licenses as declared in",
                        "their metadata; each one's license text is in its .dist-info",
                        "directory. It also bundles the Claude Code CLI, which is",
                        "proprietary Anthropic software (last paragraphs): the package as",
                        "a whole is therefore not DFSG-free.",
                    ],
                ),
            ]
        ),
        paragraph(
            [
                ("Files", "*"),
                ("Copyright", "2025-2026 the wabridge authors"),
                ("License", "Expat"),
            ]
        ),
    ]
    for dist in dists:
        name = canonical(dist.metadata["Name"])
        if name == "wabridge":
            continue
        files = files_of(dist, site, shared)
        if not files:
            continue
        lic = license_of(dist)
        for token in re.split(r"\s+(?:and|or)\s+", lic):
            used.add(token)
        fields: list[tuple[str, str | list[str]]] = [
            ("Files", files),
            ("Copyright", copyrights(dist)),
            ("License", lic),
        ]
        comment = f"{dist.metadata['Name']} {dist.version}"
        libs = sorted(p.name for p in site.glob(f"{dist.metadata['Name']}*.libs/*"))
        libs += sorted(p.name for p in site.glob(f"{name.replace('-', '_')}*.libs/*"))
        if name in EMBEDDED:
            comment += f"; embeds {EMBEDDED[name]}"
        if libs:
            comment += "; bundled shared libraries: " + ", ".join(dict.fromkeys(libs))
        if name == "claude-agent-sdk":
            comment += "; its Python code is MIT, the CLI binary in _bundled/ is not (see below)"
        fields.append(("Comment", wrap(comment)))
        paras.append(paragraph(fields))
    bundled = f"{INSTALL_PREFIX}/{site.relative_to(site.parents[2])}/claude_agent_sdk/_bundled/*"
    paras.append(
        paragraph(
            [
                ("Files", bundled),
                ("Copyright", "Anthropic PBC"),
                ("License", PROPRIETARY),
                (
                    "Comment",
                    [
                        "The Claude Code CLI (a single self-contained executable), bundled",
                        "by claude-agent-sdk and run by wabridge-worker for every Claude turn.",
                    ],
                ),
            ]
        )
    )
    for lic in sorted(used - {"unknown"}):
        if lic in GENERIC_TEXTS:
            body = GENERIC_TEXTS[lic]
        elif lic in COMMON_LICENSES:
            body = (
                f" On Debian systems, the complete text of this license can be found in\n"
                f" /usr/share/common-licenses/{COMMON_LICENSES[lic]}."
            )
        elif lic == PROPRIETARY:
            body = PROPRIETARY_TEXT
        else:
            body = (
                " The complete text is in the license file of the .dist-info directory\n"
                " of each distribution above that uses it."
            )
        paras.append(f"License: {lic}\n{body}")
    return "\n\n".join(paras) + "\n"


def wrap(text: str, width: int = 76) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    if line:
        lines.append(line)
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: gen_copyright.py SITE_PACKAGES")
    sys.stdout.write(main(sys.argv[1]))
