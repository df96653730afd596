"""Wheels for a lent GPU machine without network: what es-lightning needs that its image lacks, in ``.whl/``.

The lent machines (``nvidia-h100-x1``, ``nvidia-h200``) run Python 3.12 on x86-64 with torch, transformers,
lightning, safetensors, accelerate, scipy, scikit-learn, pyarrow, sacrebleu and more preinstalled (``IMAGE_PACKAGES``,
their image's package list as of 2026-11-17), and reach no package index. Run here, with network:

    python benchmarks/wheelhouse.py            # fills .whl/ (git-ignored), checks its size, prints the run command

It starts from ``[project].dependencies`` in pyproject.toml, leaves out what the image has, and follows every
wheel's ``Requires-Dist`` (markers evaluated for CPython 3.12 on Linux x86-64) until nothing is missing. Each
package is fetched alone (``pip download --no-deps --only-binary=:all:`` for cp312 manylinux x86-64 or pure-Python
wheels) at the version installed here when that satisfies the requirement (the version the tests ran with), else
the newest that does; a package published only as a source archive is built here into a wheel, which must be pure
Python. The wheels and this checkout's tracked and untracked files must stay under ``--limit-mib`` (default 60;
the device tool carries 64 MiB a call). es-lightning itself runs from the checkout (``PYTHONPATH``).

    python3 benchmarks/wheelhouse.py --check .whl   # there, after the install: every requirement satisfied?
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import tomllib  # Python 3.11+: this machine's and the lent machine's
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
"""
PREINSTALLED = frozenset(canonicalize_name(n) for n in IMAGE_PACKAGES.split())
INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    "{dest}/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; python3 benchmarks/wheelhouse.py --check {dest}; "
    "set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT 2>&1 | tee $OUT/gpu_check.log"
)


def product_requirements() -> list[Requirement]:
    """``[project].dependencies`` of this checkout's pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def wheel_requirements(wheel: Path, extras: set[str]) -> list[Requirement]:
    """The ``Requires-Dist`` of ``wheel`` that apply on the lent machine with ``extras`` asked for."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode("utf-8").splitlines()
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [
        r
        for r in requirements
        if r.marker is None or any(r.marker.evaluate({**TARGET, "extra": extra}) for extra in {"", *extras})
    ]


def _wheel_name(path: Path) -> str:
    return canonicalize_name(path.name.split("-")[0])


def pinned(requirement: Requirement) -> str:
    """``name==version`` for the version installed here when it satisfies ``requirement``, else the requirement."""
    try:
        here = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return f"{requirement.name}{requirement.specifier}"
    return (
        f"{requirement.name}=={here}"
        if requirement.specifier.contains(here, prereleases=True)
        else f"{requirement.name}{requirement.specifier}"
    )


def fetch(spec: str, dest: Path) -> Path:
    """One wheel for the lent machine (no dependencies) into ``dest``; a pure-Python wheel built here when the
    index has only a source archive."""
    before = set(dest.glob("*.whl"))
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    download = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(dest),
        spec,
    ]
    if subprocess.run(download, check=False, capture_output=True, text=True).returncode:
        build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec]
        done = subprocess.run(build, check=False, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"wheelhouse: no wheel for {spec}, and building one failed:\n{done.stderr[-2000:]}")
    new = sorted(set(dest.glob("*.whl")) - before)
    if len(new) != 1:
        raise SystemExit(f"wheelhouse: expected one new wheel for {spec} in {dest}, found {[p.name for p in new]}")
    if not new[0].name.endswith("-any.whl") and "cp312" not in new[0].name and "abi3" not in new[0].name:
        raise SystemExit(f"wheelhouse: {new[0].name} does not run on CPython 3.12 (built here, not pure Python?)")
    return new[0]


def collect(dest: Path, also: list[str]) -> tuple[list[Path], list[str]]:
    """Fill ``dest`` with every missing package's wheel and those of ``also`` (requirement strings, carried though
    the image has them); return the wheels and what they need from the image."""
    forced = [Requirement(text) for text in also]
    wanted = [(r, "es-lightning") for r in product_requirements()] + [(r, "--also") for r in forced]
    carried = {canonicalize_name(r.name) for r in forced}
    asked: dict[str, set[str]] = {}
    wheels: dict[str, Path] = {}
    from_image = []
    while wanted:
        requirement, needed_by = wanted.pop(0)
        name = canonicalize_name(requirement.name)
        if name in PREINSTALLED and name not in carried:
            from_image.append(f"{requirement.name}{requirement.specifier or ''} (for {needed_by})")
            continue
        if name in asked and set(requirement.extras) <= asked[name]:
            continue
        asked.setdefault(name, set()).update(requirement.extras)
        if name not in wheels:
            wheels[name] = fetch(pinned(requirement), dest)
            print(f"  {wheels[name].name} ({wheels[name].stat().st_size / MIB:.2f} MiB) for {needed_by}")
        wanted += [(r, wheels[name].name) for r in wheel_requirements(wheels[name], asked[name])]
    return sorted(wheels.values()), sorted(set(from_image))


def tree_mib() -> float:
    """This checkout's tracked and untracked, not ignored files, which travel with every call."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file()) / MIB


def check(folder: Path) -> int:
    """On the lent machine after the install: every requirement of es-lightning and of the wheels in ``folder``
    against what Python sees; 1 when a package is missing, 0 otherwise (version conflicts are printed)."""
    requirements = [(r, "es-lightning") for r in product_requirements()]
    requirements += [(r, w.name) for w in sorted(folder.glob("*.whl")) for r in wheel_requirements(w, set())]
    missing, conflicts = [], []
    for requirement, needed_by in requirements:
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{requirement} (for {needed_by})")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            conflicts.append(f"{requirement} (for {needed_by}): {version} installed")
    for line in missing:
        print(f"wheelhouse --check: MISSING {line}")
    for line in conflicts:
        print(f"wheelhouse --check: version conflict, {line}")
    print(f"wheelhouse --check: {len(requirements)} requirements, {len(missing)} missing, {len(conflicts)} conflicts")
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl", help="the wheel folder (default .whl/)")
    parser.add_argument("--limit-mib", type=float, default=60.0, help="wheels plus working tree, at most")
    parser.add_argument(
        "--also",
        nargs="+",
        default=[],
        metavar="REQUIREMENT",
        help="carry these too though the image has them, e.g. pyarrow==26.0.1 when --check there "
        "reports a version conflict",
    )
    parser.add_argument("--check", type=Path, metavar="FOLDER", help="check the installed requirements instead")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check)
    dest = args.dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # one version of each: two stop the install there
        old.unlink()
    print(f"wheelhouse: fetching into {dest}")
    wheels, from_image = collect(dest, args.also)
    wheel_mib = sum(w.stat().st_size for w in wheels) / MIB
    tree = tree_mib()
    print(
        f"\nwheelhouse: {len(wheels)} wheels, {wheel_mib:.2f} MiB; working tree {tree:.2f} MiB; together "
        f"{wheel_mib + tree:.2f} MiB of at most {args.limit_mib:g}"
    )
    print("taken from the image (check its versions with --check there):\n  " + "\n  ".join(from_image))
    if wheel_mib + tree > args.limit_mib:
        print(f"wheelhouse: over {args.limit_mib:g} MiB: the device tool would refuse the call", file=sys.stderr)
        return 1
    folder = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
    print(
        "\nOne device call (the device tool's run), installing them offline and running the GPU check:\n"
        f'  command: {INSTALL.format(dest=folder)}\n  carry: ["{folder}"]\n  timeout_s: 600'
    )
    if (
        shutil.which("git")
        and subprocess.run(["git", "check-ignore", "-q", str(dest)], check=False, cwd=ROOT).returncode
    ):
        print(
            f"wheelhouse: {folder} is not git-ignored: add it to .git/info/exclude so that it travels only when "
            "carried",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
