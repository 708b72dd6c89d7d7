#!/usr/bin/env python3
"""Install what models/manifest.toml lists into the models directory.

Run through scripts/fetch-models (see its --help). Standard library only; the
steps that build ONNX files (ncnn2onnx, generated test models) and --verify run
in a private virtualenv with pinned onnx/numpy/onnxruntime, created on first
need under the cache directory.

Exit status: 0 ok, 1 error, 2 usage, 3 sha256 mismatch.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_MANIFEST = REPO / "models" / "manifest.toml"

# The virtualenv for the steps that need onnx. Pinned so that generated ONNX
# files are byte-for-byte reproducible (their sha256 is in the manifest).
VENV_REQUIREMENTS = [
    "onnx==1.23.2",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "ml_dtypes==0.6.0",
    "typing_extensions==4.16.0",
    "onnxruntime==1.31.1",
    "flatbuffers==25.12.19",
    "packaging==26.3",
]

CHUNK = 1 << 20


class HashMismatch(Exception):
    pass


class FetchError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def cache_root() -> Path:
    if os.environ.get("ATELIER_CACHE_DIR"):
        return Path(os.environ["ATELIER_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "atelier"


def mismatch(what: str, expected: str, actual: str, detail: str = "") -> HashMismatch:
    lines = [
        f"SHA256 MISMATCH: {what}",
        f"  expected {expected}",
        f"  actual   {actual}",
    ]
    if detail:
        lines.append(f"  {detail}")
    return HashMismatch("\n".join(lines))


class Fetcher:
    def __init__(self, models_dir: Path, manifest_path: Path, quiet: bool = False):
        self.dir = models_dir
        self.manifest_path = manifest_path
        self.cache = cache_root()
        self.downloads = self.cache / "downloads"
        self.verified_archives: dict[str, Path] = {}
        self.downloaded_bytes = 0
        self.quiet = quiet
        self._venv_python: str | None = None

    def say(self, msg: str) -> None:
        if not self.quiet:
            log(msg)

    # ------------------------------------------------------------ archives
    def archive(self, src: dict) -> Path:
        """The verified archive for `src`, from the cache or downloaded."""
        key = src["sha256"]
        if key in self.verified_archives:
            return self.verified_archives[key]
        dest = self.downloads / src["registry"] / src["archive"]
        if dest.exists():
            actual = sha256_file(dest)
            if actual == src["sha256"]:
                self.verified_archives[key] = dest
                return dest
            # keep it until a download that does match replaces it
            self.say(f"  cached {dest.name} has sha256 {actual[:12]}..., not the manifest's; downloading again")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + f".part-{os.getpid()}")
        try:
            try:
                self._download_url(src, part)
            except (urllib.error.URLError, OSError, FetchError) as e:
                self.say(f"  direct download failed ({e}); trying the {src['registry']} client")
                self._download_client(src, part)
            actual = sha256_file(part)
            if actual != src["sha256"]:
                raise mismatch(f"downloaded archive {src['archive']}", src["sha256"], actual,
                               f"from {src.get('url') or src['registry']}; the file was not kept")
            size = part.stat().st_size
            if "size_bytes" in src and size != src["size_bytes"]:
                raise FetchError(f"{src['archive']}: size {size}, manifest says {src['size_bytes']}")
            os.replace(part, dest)
            self.downloaded_bytes += size
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        self.verified_archives[key] = dest
        return dest

    def _download_url(self, src: dict, out: Path) -> None:
        url = src.get("url")
        if not url:
            raise FetchError("no url in manifest")
        total = src.get("size_bytes", 0)
        self.say(f"  downloading {src['archive']} ({human(total)}) from {url.split('/')[2]}")
        t0 = time.monotonic()
        req = urllib.request.Request(url, headers={"User-Agent": "atelier-fetch-models/1"})
        with urllib.request.urlopen(req, timeout=60) as r, open(out, "wb") as f:
            got = 0
            next_report = time.monotonic() + 5
            while b := r.read(CHUNK):
                f.write(b)
                got += len(b)
                if not self.quiet and time.monotonic() > next_report and total:
                    log(f"    {100 * got // total}% of {human(total)}")
                    next_report = time.monotonic() + 5
        dt = max(time.monotonic() - t0, 1e-6)
        self.say(f"    {human(got)} in {dt:.1f} s ({human(int(got / dt))}/s)")

    def _download_client(self, src: dict, out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="atelier-fetch-") as tmp:
            if src["registry"] == "npm":
                if not shutil.which("npm"):
                    raise FetchError("npm not installed")
                cmd = ["npm", "pack", "--silent", f"{src['package']}@{src['version']}", "--pack-destination", tmp]
            elif src["registry"] == "pypi":
                archive = src["archive"]
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                       "-d", tmp, f"{src['package']}=={src['version']}"]
                if archive.endswith(".whl"):
                    # name-version-pyXY-abi-platform.whl
                    _, _, py, abi, plat = archive[:-4].split("-")[-5:]
                    cmd += ["--only-binary=:all:", "--python-version", py.removeprefix("cp"),
                            "--implementation", "cp", "--abi", abi, "--platform", plat]
                else:
                    cmd += ["--no-binary=:all:"]
            else:
                raise FetchError(f"cannot download from registry {src['registry']!r}")
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise FetchError(f"{' '.join(cmd[:3])} failed:\n{r.stderr.strip()[-2000:]}")
            files = list(Path(tmp).iterdir())
            match = [p for p in files if p.name == src["archive"]] or files
            if len(match) != 1:
                raise FetchError(f"client produced {[p.name for p in files]}, expected {src['archive']}")
            shutil.move(str(match[0]), out)

    # ------------------------------------------------------------ archive members
    @staticmethod
    def _inner(name: str, is_tar: bool) -> str:
        # npm tarballs put everything below `package/`, sdists below `name-version/`
        return name.split("/", 1)[1] if is_tar and "/" in name else name

    def stream_member(self, archive: Path, path: str):
        """Yield one package-relative member of a wheel/zip or tarball in chunks."""
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                try:
                    f = z.open(path)
                except KeyError:
                    raise FetchError(f"{archive.name}: not found in the archive: {path}") from None
                with f:
                    while b := f.read(CHUNK):
                        yield b
            return
        with tarfile.open(archive, "r:*") as t:
            for m in t:
                if m.isfile() and self._inner(m.name, True) == path:
                    f = t.extractfile(m)
                    while b := f.read(CHUNK):
                        yield b
                    return
        raise FetchError(f"{archive.name}: not found in the archive: {path}")

    def read_members(self, archive: Path, paths: set[str]) -> dict[str, bytes]:
        """Read the given package-relative paths out of a wheel/zip or tarball."""
        found: dict[str, bytes] = {}
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                for p in paths:
                    with contextlib.suppress(KeyError):
                        found[p] = z.read(p)
        else:
            with tarfile.open(archive, "r:*") as t:
                for m in t:
                    inner = self._inner(m.name, True)
                    if inner in paths and m.isfile():
                        found[inner] = t.extractfile(m).read()
                        if len(found) == len(paths):
                            break
        missing = sorted(paths - found.keys())
        if missing:
            raise FetchError(f"{archive.name}: not found in the archive: {', '.join(missing)}")
        return found

    # ------------------------------------------------------------ installing
    def install_bytes(self, entry: dict, chunks, what: str) -> None:
        """Write to a temp file next to the target, check sha256/size, rename."""
        target = self.dir / entry["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for b in chunks:
                    f.write(b)
                    h.update(b)
                    size += len(b)
            actual = h.hexdigest()
            if actual != entry["sha256"]:
                raise mismatch(f"{entry['name']} ({entry['file']})", entry["sha256"], actual, what)
            if size != entry["size_bytes"]:
                raise FetchError(f"{entry['name']}: size {size}, manifest says {entry['size_bytes']}")
            os.chmod(tmp, 0o755 if ".so" in target.name else 0o644)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def install_file(self, entry: dict, produced: Path, what: str) -> None:
        def read():
            with open(produced, "rb") as f:
                while b := f.read(CHUNK):
                    yield b
        self.install_bytes(entry, read(), what)

    def make_links(self, entry: dict) -> None:
        target = self.dir / entry["file"]
        for link in entry.get("links", []):
            lp = self.dir / link
            rel = os.path.relpath(target, lp.parent)
            if lp.is_symlink() and os.readlink(lp) == rel:
                continue
            if lp.exists() or lp.is_symlink():
                lp.unlink()
            lp.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(rel, lp)

    def status(self, entry: dict) -> str:
        target = self.dir / entry["file"]
        if not target.exists():
            return "missing"
        if target.stat().st_size != entry["size_bytes"] or sha256_file(target) != entry["sha256"]:
            return "modified"
        return "ok"

    def ensure(self, entry: dict) -> str:
        st = self.status(entry)
        if st == "ok":
            self.make_links(entry)
            return "present"
        src = entry["source"]
        method = src["method"]
        if st == "modified":
            self.say(f"  {entry['file']} differs from the manifest, replacing it")
        desc = f"{src['registry']} {src['package']}@{src['version']} {src['path']}"
        if method == "extract":
            self.install_bytes(entry, self.stream_member(self.archive(src), src["path"]), f"from {desc}")
        elif method == "join-chunks":
            self.join_chunks(entry, desc)
        elif method == "ncnn2onnx":
            self.ncnn2onnx(entry, desc)
        elif method == "generate":
            self.generate(entry, desc)
        else:
            raise FetchError(f"{entry['name']}: unknown source.method {method!r}")
        self.make_links(entry)
        return "installed"

    def join_chunks(self, entry: dict, desc: str) -> None:
        """IMG.LY's resources.json: {key: {size, chunks: [{hash, offsets: [a, b]}]}}."""
        src = entry["source"]
        archive = self.archive(src)
        res_path = src["path"]
        resources = json.loads(self.read_members(archive, {res_path})[res_path])
        spec = resources.get(src["key"])
        if spec is None:
            raise FetchError(f"{entry['name']}: key {src['key']!r} not in {res_path} (has {sorted(resources)})")
        base = res_path.rsplit("/", 1)[0] + "/" if "/" in res_path else ""
        chunks = spec["chunks"]
        data = self.read_members(archive, {base + c["hash"] for c in chunks})
        parts, pos = [], 0
        for c in sorted(chunks, key=lambda c: c["offsets"][0]):
            blob = data[base + c["hash"]]
            a, b = c["offsets"]
            if a != pos or len(blob) != b - a:
                raise FetchError(f"{entry['name']}: chunk {c['hash'][:12]} does not fit at offset {pos}")
            if hashlib.sha256(blob).hexdigest() != c["hash"]:
                raise mismatch(f"chunk {c['hash']} of {entry['name']}", c["hash"], hashlib.sha256(blob).hexdigest())
            parts.append(blob)
            pos = b
        if pos != spec["size"]:
            raise FetchError(f"{entry['name']}: chunks add up to {pos} bytes, resources.json says {spec['size']}")
        self.install_bytes(entry, parts, f"joined from {len(parts)} chunks of {desc}#{src['key']}")

    def ncnn2onnx(self, entry: dict, desc: str) -> None:
        src = entry["source"]
        members = self.read_members(self.archive(src), {src["path"], src["weights_path"]})
        with tempfile.TemporaryDirectory(prefix="atelier-ncnn-") as tmp:
            t = Path(tmp)
            (t / "model.param").write_bytes(members[src["path"]])
            (t / "model.bin").write_bytes(members[src["weights_path"]])
            self.run_py(HERE / "ncnn2onnx.py", str(t / "model.param"), str(t / "model.bin"), str(t / "out.onnx"))
            self.install_file(entry, t / "out.onnx", f"converted by scripts/models/ncnn2onnx.py from {desc}")

    def generate(self, entry: dict, desc: str) -> None:
        src = entry["source"]
        with tempfile.TemporaryDirectory(prefix="atelier-gen-") as tmp:
            out = Path(tmp) / "out.onnx"
            self.run_py(HERE / "testmodels.py", src["path"], str(out), "--check")
            self.install_file(entry, out, f"generated by {src['package']} {src['path']}")

    # ------------------------------------------------------------ python with onnx
    def venv_python(self) -> str:
        if self._venv_python:
            return self._venv_python
        if os.environ.get("ATELIER_FETCH_PYTHON"):
            self._venv_python = os.environ["ATELIER_FETCH_PYTHON"]
            return self._venv_python
        venv = Path(os.environ.get("ATELIER_FETCH_VENV") or self.cache / "venv")
        py = venv / "bin" / "python"
        stamp = venv / ".atelier-requirements"
        want = "\n".join(VENV_REQUIREMENTS) + "\n"
        venv.parent.mkdir(parents=True, exist_ok=True)
        with open(venv.parent / f".{venv.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another fetch-models may be building it
            if not (py.exists() and stamp.exists() and stamp.read_text() == want):
                self.say(f"  setting up {venv} ({', '.join(VENV_REQUIREMENTS[:2])}, onnxruntime); once")
                if venv.exists():
                    shutil.rmtree(venv)
                r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
                if r.returncode != 0:
                    raise FetchError(f"could not create {venv} (on Debian: apt-get install python3-venv; "
                                     f"or set ATELIER_FETCH_PYTHON to a python with onnx, numpy, onnxruntime):\n"
                                     f"{(r.stdout + r.stderr).strip()[-2000:]}")
                r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                    *VENV_REQUIREMENTS], capture_output=True, text=True)
                if r.returncode != 0:
                    raise FetchError(f"pip install into {venv} failed:\n{r.stderr.strip()[-3000:]}")
                stamp.write_text(want)
        self._venv_python = str(py)
        return self._venv_python

    def run_py(self, script: Path, *args: str) -> None:
        r = subprocess.run([self.venv_python(), str(script), *args], capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0:
            raise FetchError(f"{script.name} failed:\n{out}")
        for line in out.splitlines():
            self.say(f"    {line}")


def select(entries: list[dict], only: str | None, gpu: bool, test_models: bool) -> list[dict]:
    """Default entries, or the --only names; --gpu / --test-models add their groups."""
    groups = ({"gpu"} if gpu else set()) | ({"test"} if test_models else set())
    if not only:
        groups.add("default")
        return [e for e in entries if e.get("fetch", "default") in groups]
    chosen, unknown = [], []
    for w in (w.strip() for w in only.split(",")):
        if not w:
            continue
        # an exact name, else a family: `isnet` -> isnet-fp16, isnet-quint8
        hits = [e for e in entries if e["name"] == w] or [e for e in entries if e["name"].startswith(w + "-")]
        if not hits:
            unknown.append(w)
        chosen += [e for e in hits if e not in chosen]
    if unknown:
        names = ", ".join(e["name"] for e in entries)
        log(f"fetch-models: unknown name(s): {', '.join(unknown)} (known: {names})")
        raise SystemExit(2)
    chosen += [e for e in entries if e.get("fetch") in groups and e not in chosen]
    return [e for e in entries if e in chosen]  # manifest order


def main(argv=None) -> int:
    env_dir = os.environ.get("ATELIER_MODELS__DIR")
    ap = argparse.ArgumentParser(
        prog="fetch-models",
        description="Download, verify (sha256) and install the ONNX models and runtime that "
                    "models/manifest.toml lists. Idempotent: files whose sha256 already matches are skipped.",
        epilog="Downloads are cached in ${ATELIER_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/atelier}/downloads. "
               "Exit status: 0 ok, 1 error, 2 usage, 3 sha256 mismatch.")
    ap.add_argument("--dir", default=env_dir or "./models",
                    help="models directory (default: $ATELIER_MODELS__DIR, else ./models; now %(default)s)")
    ap.add_argument("--only", metavar="NAMES",
                    help="comma-separated entry names instead of the default set; a name that is not an "
                         "entry selects its family (isnet -> isnet-fp16, isnet-quint8); --gpu and "
                         "--test-models still add their groups")
    ap.add_argument("--test-models", action="store_true", help="also generate the tiny test models (models/test/)")
    ap.add_argument("--gpu", action="store_true", help="also install onnxruntime-gpu (CUDA 13 build, ~300 MiB)")
    ap.add_argument("--list", action="store_true", help="list the manifest entries and their state, fetch nothing")
    ap.add_argument("--verify", action="store_true",
                    help="afterwards load every selected ONNX model with onnxruntime, compare inputs/outputs "
                         "with the manifest and run one inference on random data")
    ap.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="manifest path (default: %(default)s)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    manifest_path = Path(args.manifest)
    with open(manifest_path, "rb") as f:
        manifest = tomllib.load(f)
    if manifest.get("schema_version") != 1:
        log(f"fetch-models: unsupported manifest schema_version {manifest.get('schema_version')!r}")
        return 1
    entries = [dict(e, _table="model") for e in manifest.get("model", [])]
    entries += [dict(e, _table="testdata") for e in manifest.get("testdata", [])]
    models_dir = Path(args.dir)
    fetcher = Fetcher(models_dir, manifest_path, args.quiet)

    if args.list:
        print(f"{'name':26} {'kind':8} {'fetch':8} {'size':>10}  {'state':8} file")
        for e in entries:
            print(f"{e['name']:26} {e.get('kind', 'testdata'):8} {e.get('fetch', 'default'):8} "
                  f"{human(e['size_bytes']):>10}  {fetcher.status(e):8} {e['file']}")
        return 0

    chosen = select(entries, args.only, args.gpu, args.test_models)
    models_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    counts = {"present": 0, "installed": 0}
    with open(models_dir / ".fetch-models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for e in chosen:
                fetcher.say(f"{e['name']}: {e['file']}")
                result = fetcher.ensure(e)
                counts[result] += 1
                fetcher.say(f"  {'ok (already installed)' if result == 'present' else 'installed'}, "
                            f"sha256 {e['sha256'][:16]}..., {human(e['size_bytes'])}")
            # keep a copy of the manifest next to the files when installing elsewhere
            if models_dir.resolve() != manifest_path.resolve().parent:
                dst = models_dir / "manifest.toml"
                if not dst.exists() or dst.read_bytes() != manifest_path.read_bytes():
                    shutil.copyfile(manifest_path, dst)
        except HashMismatch as e:
            log(f"\nfetch-models: {e}\nfetch-models: refusing to install; nothing was replaced.")
            return 3
        except FetchError as e:
            log(f"\nfetch-models: error: {e}")
            return 1
    dt = time.monotonic() - t0
    log(f"fetch-models: {len(chosen)} entries in {models_dir} ({counts['installed']} installed, "
        f"{counts['present']} already there), downloaded {human(fetcher.downloaded_bytes)}, {dt:.1f} s")

    if args.verify:
        selected = [e["name"] for e in chosen if e["_table"] == "model"]
        try:
            r = subprocess.run([fetcher.venv_python(), str(HERE / "verify.py"), "--manifest", str(manifest_path),
                                "--dir", str(models_dir), "--only", ",".join(selected)])
        except FetchError as e:
            log(f"fetch-models: error: {e}")
            return 1
        return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
