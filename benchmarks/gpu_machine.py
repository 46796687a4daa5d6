"""What the lent GPU machine has, what the GPU check carries to it, and a check
that every import the check makes is one or the other.

The GPU machine (the device tool's KINDS.md, read 2026-11-17, and the shared
GPU.md) has Python 3.12.3, torch 2.11.0+cu130, triton 3.6.0, transformers
5.17.0, accelerate 1.15.0 and the packages in :data:`ON_MACHINE`, and no
network. What the check needs beyond them travels as wheels in ``.whl/``
(:data:`WHEELS`, downloaded by ``scripts/gpu_wheels.sh``): bitsandbytes (the
benchmark table's peer, 43 MB of the 64 MiB a call may carry) and liger-kernel
(the fused blocks' RMSNorm, RoPE and cross-entropy on CUDA, pure Python);
torchao and trl are not imported by the check, so they stay behind.

``python -m benchmarks.gpu_machine --wheels`` prints the wheel specs;
``python -m benchmarks.gpu_machine --check`` reads every Python file the GPU
check runs (the package, benchmarks/, tests/) and fails if a hard import (not
inside ``try``/``except ImportError`` and not ``pytest.importorskip``) is
neither the standard library, this repository, on the machine nor in the wheels;
with ``--wheel-dir .whl`` it also checks the wheels' own requirements.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import re
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The machine's Python packages (KINDS.md, "Python packages already there"),
# normalized names; versions where a session read them.
ON_MACHINE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
VERSIONS = {"python": "3.12.3", "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0",
            "accelerate": "1.15.0", "safetensors": "0.8.0", "numpy": "2.5.2", "huggingface-hub": "1.33.0"}

# What the check imports that the machine lacks: the carried wheels (one version each).
WHEELS = ("bitsandbytes==0.50.2", "liger-kernel==0.8.5")
WHEEL_PLATFORMS = ("manylinux_2_24_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64")
WHEEL_PYTHON = "3.12"

# Import names whose distribution is named otherwise.
DIST_OF = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "cv2": "opencv-python-headless",
           "dateutil": "python-dateutil", "google": "protobuf", "jwt": "pyjwt", "pytest_benchmark": "pytest-benchmark",
           "xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout", "huggingface_hub": "huggingface-hub"}
# The Python files the GPU check runs: the package, the benchmarks, the tests pytest collects.
SCANNED = ("qlora_triton", "benchmarks", "tests")


def normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def wheel_names() -> set[str]:
    return {normalize(spec.split("==")[0]) for spec in WHEELS}


def _first_party() -> set[str]:
    names = set()
    for folder in (ROOT, ROOT / "tests", ROOT / "scripts", ROOT / "benchmarks"):
        names |= {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}
    return names


def _soft_handlers(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names |= {getattr(t, "id", getattr(t, "attr", "")) for t in types if t is not None}
        if handler.type is None:
            names.add("BaseException")
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """``(top-level module, line, hard)`` of every absolute import in ``path``;
    ``hard`` is False inside ``try``/``except ImportError`` and for
    ``pytest.importorskip("name")``."""
    tree = ast.parse(path.read_text(), str(path))
    soft_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and _soft_handlers(node):
            for inner in node.body:
                soft_lines |= {n.lineno for n in ast.walk(inner) if hasattr(n, "lineno")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], node.lineno, node.lineno not in soft_lines) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno, node.lineno not in soft_lines))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((str(node.args[0].value).split(".")[0], node.lineno, False))
    return found


def check(root: pathlib.Path = ROOT, scanned: tuple[str, ...] = SCANNED) -> tuple[list[str], list[str], set[str]]:
    """(problems, soft imports missing on the machine, distributions the check imports)."""
    stdlib = set(sys.stdlib_module_names)
    local = _first_party()
    problems, soft, used = [], [], set()
    have = ON_MACHINE | wheel_names()
    for top in scanned:
        for path in sorted((root / top).rglob("*.py")):
            for module, line, hard in imports(path):
                if module in stdlib or module in local or module == "__future__":
                    continue
                dist = normalize(DIST_OF.get(module, module))
                where = f"{path.relative_to(root)}:{line}"
                if dist in have:
                    used.add(dist)
                elif hard:
                    problems.append(f"{where}: imports {module} ({dist}): not on the GPU machine, not in WHEELS")
                else:
                    soft.append(f"{where}: {module} (optional: skipped or handled there)")
    return problems, soft, used


def check_wheel_requirements(wheel_dir: pathlib.Path) -> list[str]:
    """Each carried wheel's requirements (not extras) are on the machine or carried too."""
    problems = []
    have = ON_MACHINE | wheel_names()
    wheels = sorted(wheel_dir.glob("*.whl"))
    found = {normalize(w.name.split("-")[0]) for w in wheels}
    problems += [f"{wheel_dir}: no wheel for {name}" for name in sorted(wheel_names() - found)]
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            for line in zf.read(meta).decode().splitlines():
                if line.startswith("Requires-Dist:") and "extra ==" not in line:
                    dist = normalize(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
                    if dist not in have:
                        problems.append(f"{wheel.name} requires {dist}: not on the GPU machine, not carried")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_machine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", action="store_true", help="print the wheel specs to carry, one a line")
    parser.add_argument("--download-args", action="store_true",
                        help="print pip download's target options (python version, platforms), one a line")
    parser.add_argument("--check", action="store_true", help="check the imports of the GPU check")
    parser.add_argument("--wheel-dir", help="with --check: also check the wheels in this folder")
    args = parser.parse_args(argv)
    if args.wheels:
        print("\n".join(WHEELS))
    if args.download_args:
        print("\n".join(["--python-version", WHEEL_PYTHON, "--implementation", "cp",
                         *[a for p in WHEEL_PLATFORMS for a in ("--platform", p)]]))
    if not args.check:
        return 0
    problems, soft, used = check()
    if args.wheel_dir:
        problems += check_wheel_requirements(pathlib.Path(args.wheel_dir))
    print(f"imports: {len(used)} distributions, each on the GPU machine or carried: {', '.join(sorted(used))}")
    print(f"wheels to carry (.whl/, scripts/gpu_wheels.sh): {', '.join(WHEELS)}")
    for line in soft:
        print(f"optional, absent there: {line}")
    for line in problems:
        print(f"MISSING {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
