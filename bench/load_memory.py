"""Peak memory and time of loading GPT-2-shaped weights, gptspec beside each framework's own loader.

    python -m bench.load_memory [--preset gpt2] [--dir /tmp/gptspec-load-bench] [--backends torch,mlx,tinygrad]
                                [--dtypes float32,bfloat16] [--mlx-lm-python /path/to/venv/bin/python]
                                [--formats safetensors,bin,nanogpt,llmc] [--against /path/to/other/checkout]

One synthetic checkpoint in the Hugging Face layout (`model.safetensors` with the hub's unprefixed
keys, `config.json`), float32, is written once; every loader then runs in a fresh process on that
same file: the import of the framework first (its footprint is the baseline), then the load, then one
forward of (1, 64) tokens. Peak is the resident set's high-water mark above that baseline (Linux
VmHWM, reset after the imports; ru_maxrss less the baseline elsewhere), load time is the load alone, in
wall-clock seconds and in the CPU seconds of the process (every thread, the kernel's page faults
included), which a shared machine's other work disturbs less.

Loaders: `gptspec` (`gptspec.backends.load(backend, DIR, dtype=...)`), and the anchors:
  torch     transformers' `GPT2LMHeadModel.from_pretrained(DIR, dtype=...)` (memory-mapped safetensors)
  mlx       mlx-lm's `load_model(DIR)` when `--mlx-lm-python` names a Python that has it, and MLX's
            own `mx.load(file)` + `model.load_weights` into gptspec's MLX model (what mlx-lm does inside)
  tinygrad  `nn.state.safe_load(file)` + `nn.state.load_state_dict` into gptspec's tinygrad model,
            as tinygrad's examples load weights
`--formats` adds gptspec's load from the same weights as `pytorch_model.bin`, a nanoGPT `ckpt.pt` and
an llm.c `.bin` (float32), which may cost more; `canonical` adds the same weights as a canonical
gptspec file (no Conv1D transposes), loaded by gptspec beside each framework's own loader of that file
(torch: `safetensors.torch.load_file` + `load_state_dict(assign=True)` into gptspec's torch model; MLX:
`mx.load` + `load_weights`; tinygrad: `safe_load` + `load_state_dict`). `--against` measures another checkout's gptspec (e.g.
the tree before issue 17) in the same run, imported through PYTHONPATH. `--reference 1x64` measures the
float64 reference's loss_and_grads on --preset instead (peak RSS of a fresh process, B1 x T64).
Benchmarks measure; they never assert.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKENS_SHAPE = (1, 64)
MIB = 1024 * 1024


# -- in the child: one loader, one dtype, in a fresh process -------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _max_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset the high-water mark to the current resident set (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


VOCAB_VARIABLE = "GPTSPEC_LOAD_BENCH_VOCAB"  # the checkpoint's vocabulary, passed to each child


def _tokens():
    import numpy as np

    return np.random.default_rng(0).integers(0, int(os.environ.get(VOCAB_VARIABLE, 50257)), TOKENS_SHAPE, dtype=np.int64)


def _hf_key_to_canonical(key: str) -> str:
    return key.removeprefix("transformer.")


def _prepare(loader: str, dtype: str):
    """Import what `loader` needs (the baseline) and return (load, forward) closures."""
    if loader.startswith("gptspec:"):
        return _gptspec(loader.split(":", 1)[1], dtype)
    makers = {"hf-torch": _hf_torch, "torch-safetensors": _torch_safetensors, "mlx-lm": _mlx_lm,
              "mx.load": _mx_load, "tinygrad": _tinygrad}
    if loader not in makers:
        raise SystemExit(f"unknown loader {loader!r}")
    return makers[loader](dtype)


def _gptspec(name: str, dtype: str):
    from gptspec.backends import get

    backend = get(name)
    backend.version()

    def load(path):
        return backend.load(str(path), dtype=dtype)

    return load, lambda model: backend.forward(model, _tokens())


def _hf_torch(dtype: str):
    import torch
    from transformers import GPT2LMHeadModel

    def load(path):
        return GPT2LMHeadModel.from_pretrained(path, dtype=getattr(torch, dtype)).eval()

    def forward(model):
        with torch.no_grad():
            return model(torch.from_numpy(_tokens())).logits.float().numpy()

    return load, forward


def _torch_safetensors(dtype: str):
    """torch's own way to load a safetensors state dict: safetensors' torch loader, then
    `load_state_dict(assign=True)` into gptspec's torch model laid out on the meta device (as gptspec lays
    it out: its `_new_model` skips the initialisers, whose meta path imports torch._dynamo, 1.5 s)."""
    import torch
    from safetensors.torch import load_file

    from gptspec.backends import get

    backend = get("torch")

    def load(path):
        spec, file, transposed = _layout(path)
        model = backend._new_model(spec, torch.device("cpu"))
        state = {}
        for key, t in load_file(str(file)).items():
            name = _hf_key_to_canonical(key)
            t = t.T.contiguous() if name in transposed else t
            state[name] = t.to(getattr(torch, dtype))
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    return load, lambda model: backend.forward(model, _tokens())


def _layout(path):
    """(spec, safetensors file, the names stored transposed) of a bench checkpoint: a Hugging Face directory
    or a canonical file."""
    path = Path(path)
    if path.is_file():
        from gptspec.weights import read

        return read(path).spec, path, set()
    spec = _spec(path)
    from gptspec.spec import param_table

    return spec, path / "model.safetensors", {p.name for p in param_table(spec) if p.hf_transposed}


def _mlx_lm(dtype: str):
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    def load(path):
        model, _ = load_model(Path(path))
        if dtype != "float32":
            model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())
        return model

    return load, lambda model: np.array(model(mx.array(_tokens())).astype(mx.float32))


def _mx_load(dtype: str):
    from gptspec.backends import get

    backend = get("mlx")
    backend.version()  # gptspec's MLX backend first: it loads an optimised BLAS before mlx.core does
    import mlx.core as mx

    def load(path):
        spec, file, transposed = _layout(path)
        model = backend.model_class(spec)(spec, mx.cpu)
        renamed = []
        for key, w in mx.load(str(file)).items():
            name = _hf_key_to_canonical(key)
            renamed.append((name, (w.T if name in transposed else w).astype(getattr(mx, dtype))))
        model.load_weights(renamed)
        mx.eval(model.parameters())
        return model

    return load, lambda model: backend.forward(model, _tokens())


def _tinygrad(dtype: str):
    from tinygrad import Device, dtypes, nn

    from gptspec.backends import get
    from gptspec.backends.tinygrad.backend import ensure_bfloat16

    backend = get("tinygrad")

    def load(path):
        spec, file, transposed = _layout(path)
        model = backend.model_class(spec)(spec)
        if dtype == "bfloat16":
            ensure_bfloat16(Device.DEFAULT)  # as gptspec does: tinygrad's bf16 emulation where clang has no __bf16
        state = {}
        for key, t in nn.state.safe_load(str(file)).items():
            name = _hf_key_to_canonical(key)
            t = t.T if name in transposed else t
            # safe_load's tensors live on the DISK device, which cannot cast: cast on the compute device
            state[name] = t.to(Device.DEFAULT).cast(getattr(dtypes, dtype)) if dtype != "float32" else t
        nn.state.load_state_dict(model, state, verbose=False)
        return model

    return load, lambda model: backend.forward(model, _tokens())


def _spec(path):
    from gptspec.weights.hf import spec_from_config

    return spec_from_config(json.loads((Path(path) / "config.json").read_text()), str(path))


def child(loader: str, dtype: str, path: str) -> dict:
    load, forward = _prepare(loader, dtype)
    base_kib = _status_kib("VmRSS")
    exact = _reset_peak()
    if not exact:
        base_kib = _max_rss_kib()
    t0, c0 = time.perf_counter(), time.process_time()
    model = load(path)
    load_s, load_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    loaded_kib = _status_kib("VmHWM") if exact else _max_rss_kib()
    t0 = time.perf_counter()
    forward(model)
    forward_s = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM") if exact else _max_rss_kib()
    return {"loader": loader, "dtype": dtype, "import_mib": base_kib / 1024, "load_peak_mib": (loaded_kib - base_kib) / 1024,
            "peak_mib": (peak_kib - base_kib) / 1024, "load_s": load_s, "load_cpu_s": load_cpu_s, "forward_s": forward_s,
            "exact_peak": exact}


def reference_child(preset: str, batch: int, length: int) -> dict:
    """Peak RSS of the float64 reference's loss_and_grads on `preset` (weights as the conformance runner
    gives them: float32 kept, float64 rounded copies), from the process's start."""
    import numpy as np

    from gptspec.spec import ModelSpec, reference
    from gptspec.weights import round_to_dtype, synthetic_params

    spec = ModelSpec.preset(preset)
    params = synthetic_params(spec, 0, "conformance")
    params64 = {n: round_to_dtype(a, "float32").astype(np.float64) for n, a in params.items()}
    rng = np.random.default_rng(0)
    tokens, targets = (rng.integers(0, spec.vocab_size, (batch, length)) for _ in range(2))
    t0 = time.perf_counter()
    reference.loss_and_grads(spec, params64, tokens, targets)
    return {"preset": preset, "batch": batch, "length": length, "n_params": spec.n_params,
            "peak_mib": _max_rss_kib() / 1024, "seconds": time.perf_counter() - t0}


# -- in the parent: the checkpoints, the processes, the table ---------------------------------------
def write_checkpoints(directory: Path, preset: str, formats: list[str]) -> dict[str, Path]:
    """The bench's files (written once, kept): {format: path}."""
    import numpy as np

    from gptspec.spec import ModelSpec, param_table
    from gptspec.weights import save, synthetic_params, write_llmc, write_nanogpt
    from gptspec.weights.format import write_safetensors
    from gptspec.weights.hf import config_from_spec

    spec = ModelSpec.preset(preset)
    hf = directory / f"{preset}-hf"
    paths = {"safetensors": hf, "bin": directory / f"{preset}-hf-bin", "nanogpt": directory / f"{preset}-ckpt.pt",
             "llmc": directory / f"{preset}_llmc.bin", "canonical": directory / f"{preset}.safetensors"}
    wanted = {f: paths[f] for f in ["safetensors", *formats]}
    if all(p.exists() for p in wanted.values()):
        return wanted
    params = synthetic_params(spec, 0, "gpt2")
    config = dict(config_from_spec(spec), gptspec_synthetic=True)
    if not hf.exists():
        # the hub's gpt2 file has no "transformer." prefix; every loader here reads that layout
        tensors = {p.name: np.ascontiguousarray(params[p.name].T) if p.hf_transposed else params[p.name]
                   for p in param_table(spec)}
        hf.mkdir(parents=True)
        write_safetensors(hf / "model.safetensors", tensors, "float32", {"format": "pt", "synthetic": "true"})
        (hf / "config.json").write_text(json.dumps(config, indent=2))
    if "bin" in wanted and not paths["bin"].exists():
        import torch

        paths["bin"].mkdir(parents=True)
        torch.save({("transformer." + p.name): torch.from_numpy(
            np.ascontiguousarray(params[p.name].T) if p.hf_transposed else params[p.name]) for p in param_table(spec)},
            paths["bin"] / "pytorch_model.bin")
        (paths["bin"] / "config.json").write_text(json.dumps(config, indent=2))
    if "nanogpt" in wanted and not paths["nanogpt"].exists():
        write_nanogpt(paths["nanogpt"], spec, params, "float32", synthetic=True)
    if "llmc" in wanted and not paths["llmc"].exists():
        write_llmc(paths["llmc"], spec, params, "float32", synthetic=True)
    if "canonical" in wanted and not paths["canonical"].exists():
        save(paths["canonical"], spec, params, "float32", synthetic=True)
    return wanted


def run_child(loader: str, dtype: str, path: Path, vocab: int, python: str = sys.executable,
              pythonpath: str | None = None) -> dict:
    env = dict(os.environ, **{VOCAB_VARIABLE: str(vocab)})
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [python, "-m", "bench.load_memory", "--child", loader, dtype, str(path)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    except OSError as e:  # e.g. a --mlx-lm-python that is not there
        return {"loader": loader, "dtype": dtype, "error": f"cannot run {python}: {e}"}
    if out.returncode != 0:
        return {"loader": loader, "dtype": dtype, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("LOADER", "DTYPE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--reference-child", nargs=3, metavar=("PRESET", "B", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="append", default=[], metavar="BxT",
                    help="instead of the loaders: the float64 reference's peak on --preset at batch B, length T")
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "gptspec-load-bench"))
    ap.add_argument("--backends", default="torch,mlx,tinygrad")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--mlx-lm-python", default=None, help="a Python with mlx-lm installed, for its load_model")
    ap.add_argument("--formats", default="", help="also gptspec's load of: canonical,bin,nanogpt,llmc")
    ap.add_argument("--against", action="append", default=[], metavar="CHECKOUT",
                    help="another gptspec checkout, measured beside this one (repeatable)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each loader (interleaved); the table shows medians")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.reference_child:
        preset, batch, length = args.reference_child
        print(json.dumps(reference_child(preset, int(batch), int(length))))
        return
    if args.reference:
        for shape in args.reference:
            batch, length = shape.lower().split("x")
            out = subprocess.run([sys.executable, "-m", "bench.load_memory", "--reference-child", args.preset, batch,
                                  length], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            r = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}
            print(f"reference loss_and_grads {args.preset} B{batch} x T{length}: " + (
                f"peak RSS {r['peak_mib']:.0f} MiB ({r['peak_mib'] * MIB / r['n_params']:.1f} bytes per parameter), "
                f"{r['seconds']:.1f} s" if "error" not in r else f"failed: {r['error']}"))
        return

    formats = [f for f in args.formats.split(",") if f]
    paths = write_checkpoints(Path(args.dir), args.preset, formats)
    size_mib = (paths["safetensors"] / "model.safetensors").stat().st_size / MIB
    with tempfile.TemporaryDirectory(prefix="gptspec-against-") as links:
        rows = measure_all(args, paths, _linked_checkouts(args.against, Path(links)))
    print_table(rows, size_mib, args.preset)


def _linked_checkouts(checkouts: list[str], links: Path) -> list[tuple[str, str]]:
    """(a PYTHONPATH entry that imports the checkout as `gptspec`, its label) for each checkout."""
    out = []
    for i, checkout in enumerate(checkouts):
        (links / str(i)).mkdir()
        os.symlink(Path(checkout).resolve(), links / str(i) / "gptspec")
        out.append((str(links / str(i)), f"gptspec ({Path(checkout).name})"))
    return out


def measure_all(args, paths: dict[str, Path], others: list[tuple[str, str]]) -> list[dict]:
    from gptspec.spec import ModelSpec

    formats = [f for f in args.formats.split(",") if f]
    vocab = ModelSpec.preset(args.preset).vocab_size
    anchors = {"torch": [("hf-torch", sys.executable)],
               "mlx": ([("mlx-lm", args.mlx_lm_python)] if args.mlx_lm_python else []) + [("mx.load", sys.executable)],
               "tinygrad": [("tinygrad", sys.executable)]}
    canonical_anchors = {"torch": "torch-safetensors", "mlx": "mx.load", "tinygrad": "tinygrad"}
    rows = []
    for backend in args.backends.split(","):
        for dtype in args.dtypes.split(","):
            runs = [(f"gptspec:{backend}", sys.executable, None, "gptspec", paths["safetensors"])]
            runs += [(f"gptspec:{backend}", sys.executable, link, label, paths["safetensors"]) for link, label in others]
            runs += [(loader, python, None, loader, paths["safetensors"]) for loader, python in anchors[backend]]
            if "canonical" in formats:  # the same weights in gptspec's own layout, beside the framework's loader of it
                runs += [(f"gptspec:{backend}", sys.executable, None, "gptspec canonical", paths["canonical"])]
                runs += [(f"gptspec:{backend}", sys.executable, link, f"{label} canonical", paths["canonical"])
                         for link, label in others]
                runs += [(canonical_anchors[backend], sys.executable, None, f"{canonical_anchors[backend]} canonical",
                          paths["canonical"])]
            if dtype == "float32":
                runs += [(f"gptspec:{backend}", sys.executable, None, f"gptspec {fmt}", paths[fmt])
                         for fmt in formats if fmt != "canonical"]
            results = {label: [] for *_, label, _ in runs}
            for _ in range(args.repeat):  # interleaved, so that every loader meets the same machine load
                for loader, python, pythonpath, label, path in runs:
                    result = run_child(loader, dtype, path, vocab, python, pythonpath)
                    results[label].append(result)
                    print(json.dumps(dict(result, label=label)), file=sys.stderr, flush=True)
            for label, got in results.items():
                rows.append(dict(_median(got), backend=backend, label=label))
    return rows


def _median(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    out = dict(ok[0])
    for key in ("import_mib", "load_peak_mib", "peak_mib", "load_s", "load_cpu_s", "forward_s"):
        out[key] = statistics.median(r[key] for r in ok)
    return out


def print_table(rows: list[dict], size_mib: float, preset: str) -> None:
    print(f"\n{preset}: a {size_mib:.0f} MiB float32 checkpoint (Hugging Face layout); peak = resident high-water "
          f"mark above the imports' footprint, load + one forward of {TOKENS_SHAPE}\n")
    print("| backend | dtype | loader | import (MiB) | peak (MiB) | peak / file | load (s) | load CPU (s) "
          "| load + forward (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | {r['dtype']} | {r['label']} | failed: {r['error']} | | | | | |")
            continue
        print(f"| {r['backend']} | {r['dtype']} | {r['label']} | {r['import_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] / size_mib:.2f}x | {r['load_s']:.2f} | {r['load_cpu_s']:.2f} | "
              f"{r['load_s'] + r['forward_s']:.2f} |")


if __name__ == "__main__":
    main()
