"""Conformance across machines: run artifacts recorded here, compared anywhere.

    paths = record([get("torch")], cases(), ["float32"], "artifacts/")
    result = compare(paths + other_machines_paths)     # pairwise, and against the float64 reference

The file each run is saved in: conformance/artifact_file.py.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..spec import DTYPES, SPEC_VERSION, SpecError, WeightsError, param_table, reference
from ..weights import round_to_dtype
from ..weights.format import fingerprint
from .artifact_file import (Artifact, ArtifactError, TrajectoryArtifact, file_name, metadata, read, tensors_of,
                            trajectory_metadata, trajectory_tensors, write)
from .cases import Case, exit_draws
from .metrics import Check
from .runner import (Outcome, Reference, Run, backend_gap, _frozen, backend_run, compare_runs, has_unit_norm_weights, memory_gap,
                     perturb, reference_run)
from .trajectory import (ReferenceTrajectory, TrajectoryCase, backend_trajectory, cached_trajectory,
                         compare_trajectories, reference_trajectory, trains)


@dataclass
class Recorded:
    case: str
    backend: str
    device: str
    dtype: str
    status: str                 # "written" | "error" | a gap (runner.GAPS)
    path: Path | None = None
    message: str = ""
    seconds: float = 0.0


@dataclass
class Comparison:
    artifacts: list[Artifact]
    outcomes: list[Outcome]
    notes: list[str] = field(default_factory=list)  # reference comparisons skipped, and why

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)


# -- recording --------------------------------------------------------------------------------
def _run_and_write(res, run_backend, write_run) -> None:
    """One backend's recording: run it, then write its artifact; a crash is that backend's "error", not fatal."""
    try:
        run = run_backend()
    except Exception as e:
        res.status, res.message = "error", f"{type(e).__name__}: {e}"
    else:
        res.path = write_run(run)
        res.seconds = run.seconds

def portable(case: Case, weights_name: str | None) -> Case:
    """The case as another machine can name it: real weights by name, not by this machine's path."""
    if case.weights is None:
        return case
    name = weights_name or case.weights
    if not os.path.exists(name):
        return replace(case, weights=name)  # already a name: "gpt2", "openai-community/gpt2"
    p = Path(name)
    if "snapshots" in p.parts and p.parts[p.parts.index("snapshots") - 1].startswith("models--"):
        return replace(case, weights="/".join(p.parts[p.parts.index("snapshots") - 1].split("--")[1:]))
    return replace(case, weights=p.stem if p.suffix == ".safetensors" else p.name)


def inputs_of(case: Case) -> Reference:
    """What backend_run needs (spec, weights, inputs), without computing the float64 reference."""
    ckpt = case.checkpoint()
    tokens, targets = case.inputs(ckpt.spec)
    ref = Reference(ckpt.spec, tokens, targets, _frozen(ckpt.params), None, None, None, ckpt.synthetic,
                    draws=exit_draws(ckpt.spec, ckpt.params, tokens, case.seed))
    if has_unit_norm_weights(ckpt.spec):
        ref.perturbed = _frozen(perturb(ckpt.spec, ckpt.params, case.seed))
    return ref


def record(backends: list, cases: Iterable[Case], dtypes: Iterable[str], out: str | os.PathLike, *,
           device: str | None = None, weights_name: str | None = None,
           on_result: Callable[[Recorded], None] | None = None,
           trajectories: Iterable[tuple[TrajectoryCase, str]] = ()) -> list[Recorded]:
    """Run every backend on every case x dtype and write one artifact each into `out` (a directory,
    or a .safetensors file when exactly one artifact results); then every backend's training run of
    each (trajectory case, precision) of `trajectories`. A backend that raises is reported as an
    error and the others are still recorded."""
    cases, dtypes, out, trajectories = list(cases), list(dtypes), Path(out), list(trajectories)
    count = (len(cases) * len(dtypes) + len(trajectories)) * len(backends)
    if out.suffix == ".safetensors" and count != 1:
        raise ArtifactError(f"--out {out} names one file, but {count} artifacts would be written: pass a directory")
    results = []
    for case in cases:
        inputs, pcase = inputs_of(case), portable(case, weights_name)
        fp = fingerprint(inputs.spec, inputs.params)
        for dtype in dtypes:
            for b in backends:
                dev = device or b.devices()[0]
                res = Recorded(pcase.id, b.name, dev, dtype, "written")
                gap = backend_gap(b, inputs.spec, dtype, dev)
                if gap:
                    res.status, res.message = gap
                else:
                    target = out if out.suffix == ".safetensors" else out / file_name(pcase.id, b.name, dev, dtype)
                    _run_and_write(res, lambda: backend_run(b, inputs, dtype, dev), lambda run: write(
                        target, tensors_of(run, inputs.tokens, inputs.targets, inputs.draws),
                        metadata(b, case, pcase, inputs, fp, dtype, dev)))
                results.append(res)
                if on_result:
                    on_result(res)
    for case, precision in trajectories:
        results += record_trajectory(backends, case, precision, out, device=device, on_result=on_result)
    return results


def trajectory_inputs(case: TrajectoryCase, precision: str) -> ReferenceTrajectory:
    """What a backend's training run needs (the model, the run, the starting weights, the batches).
    The early-exit draws of each step come from the reference's weights at that step, so only that
    loss computes the float64 reference to record."""
    if case.spec.loss == "early_exit":
        return reference_trajectory(case, precision)
    initial = case.params()
    for a in initial.values():
        a.setflags(write=False)
    return ReferenceTrajectory(spec=case.spec, train_spec=case.train_spec(precision), initial=initial,
                               batches=case.batches())


def inputs_digest(case: TrajectoryCase) -> str:
    """sha256 of the case's micro-batches (tokens and targets of every step), as generated here."""
    h = hashlib.sha256()
    for step in case.batches():
        for tokens, targets in step:
            h.update(np.ascontiguousarray(tokens, np.int64).tobytes())
            h.update(np.ascontiguousarray(targets, np.int64).tobytes())
    return "sha256:" + h.hexdigest()


def record_trajectory(backends: list, case: TrajectoryCase, precision: str, out: Path, *, device: str | None = None,
                      on_result: Callable[[Recorded], None] | None = None) -> list[Recorded]:
    """Every backend's training run of `case` in `precision`, one trajectory artifact each."""
    gap = memory_gap(case.model_case) or ("" if precision in case.precisions
                                          else f"{case.id} runs in {', '.join(case.precisions)} only")
    inputs = None if gap else trajectory_inputs(case, precision)
    fp = digest = ""
    if inputs is not None:
        fp, digest = fingerprint(inputs.spec, inputs.initial), inputs_digest(case)
    results = []
    for b in backends:
        dev = device or b.devices()[0]
        res = Recorded(case.id, b.name, dev, precision, "written")
        if gap:
            res.status, res.message = "not run", gap
        elif b.unsupported(case.spec):
            res.status, res.message = "not implemented", b.unsupported(case.spec)
        elif not trains(b):
            res.status, res.message = "not implemented", f"{b.name} does not train (SPEC.md 20)"
        else:
            target = out if out.suffix == ".safetensors" else out / file_name(case.id, b.name, dev, precision)
            _run_and_write(res, lambda: backend_trajectory(b, case, inputs, dev), lambda run: write(
                target, trajectory_tensors(run), trajectory_metadata(b, case, inputs.spec, inputs.train_spec, fp,
                                                                     digest, dev)))
        results.append(res)
        if on_result:
            on_result(res)
    return results


# -- comparing --------------------------------------------------------------------------------
def _refuse(a: Artifact, b: Artifact, what: str) -> None:
    raise ArtifactError(f"refusing to compare {a.path} with {b.path}: both claim case {a.case}, but {what}")


def check_consistent(group: list[Artifact]) -> None:
    """Artifacts of one case must hold the same checkpoint, spec version, model and inputs."""
    first = group[0]
    for other in group[1:]:
        for key, what in (("spec_version", "spec versions"), ("fingerprint", "checkpoints (fingerprint)")):
            if first.meta.get(key) != other.meta.get(key):
                _refuse(first, other, f"they were written for different {what}: "
                                      f"{first.meta.get(key)} vs {other.meta.get(key)}")
        if first.spec != other.spec:
            _refuse(first, other, "they describe different models (model_spec differs)")
        if (first.draws is None) != (other.draws is None):
            _refuse(first, other, "only one of them holds early-exit draws")
        for name in ("tokens", "targets") + (("draws",) if first.draws is not None else ()):
            x, y = getattr(first, name), getattr(other, name)
            if x.shape != y.shape or not np.array_equal(x, y):
                differ = (f"shapes {x.shape} vs {y.shape}" if x.shape != y.shape
                          else f"{int((x != y).sum())} positions differ")
                _refuse(first, other, f"they hold different inputs ({name}: {differ})")
    if first.meta["spec_version"] != SPEC_VERSION:
        raise ArtifactError(f"{first.path}: written for spec version {first.meta['spec_version']}, "
                            f"this gptspec implements {SPEC_VERSION}")


def locate_reference(art: Artifact, weights: Iterable[str] = ()) -> tuple[Case | None, str]:
    """The case whose checkpoint has the artifact's fingerprint here, or None and why not."""
    try:
        case = Case(**json.loads(art.meta["case_fields"]))
    except (TypeError, ValueError) as e:
        return None, f"reference comparison skipped for {art.case}: its case_fields are not understood here ({e})"
    if case.weights is None:
        try:
            same = case.spec == art.spec
        except (SpecError, WeightsError) as e:
            return None, f"reference comparison skipped for {art.case}: its case is not understood here ({e})"
        if not same:  # never synthesize a model the artifact's own tensors do not hold (SPEC.md 8)
            return None, (f"reference comparison skipped for {art.case}: its case ({case.preset}, variant "
                          f"{case.variant}) builds a different model here than its model_spec and gradients describe")
    names = [None] if case.weights is None else list(dict.fromkeys(
        n for n in (*weights, case.weights, art.meta.get("weights_path")) if n))
    tried = []
    for name in names:
        candidate = case if name is None else replace(case, weights=name)
        try:
            ckpt = candidate.checkpoint()
        except (WeightsError, SpecError, OSError) as e:
            why = str(e).splitlines()[0].removesuffix(" Looked in:")
            tried.append(why if why.startswith(str(name)) else f"{name}: {why}")
            continue
        fp = fingerprint(ckpt.spec, ckpt.params) if ckpt.spec == art.spec else "a different model_spec"
        if fp == art.meta["fingerprint"]:
            return candidate, ""
        tried.append(f"{name or candidate.id + ' (synthetic)'}: different weights here ({fp[:23]}...)")
    hint = "" if case.weights is None else f"; pass --weights PATH to the checkpoint named {case.weights!r}"
    return None, (f"reference comparison skipped for {art.case}: no checkpoint with fingerprint "
                  f"{art.meta['fingerprint'][:23]}... found here (tried {'; '.join(tried)}){hint}")


def reference_for(case: Case, dtype: str, tokens: np.ndarray, targets: np.ndarray,
                  draws: np.ndarray | None = None) -> Reference:
    """runner.reference_run, on the artifact's inputs (recomputed only when they are not the case's)."""
    ref = reference_run(case, dtype)
    same_draws = (draws is None and ref.draws is None) or (
        draws is not None and ref.draws is not None and np.array_equal(ref.draws, draws))
    if np.array_equal(ref.tokens, tokens) and np.array_equal(ref.targets, targets) and same_draws:
        return ref
    rounded = {n: round_to_dtype(a, dtype).astype(np.float64) for n, a in ref.params.items()}
    r = reference.loss_and_grads(ref.spec, rounded, tokens, targets, draws)
    stats = reference.residual_stats(ref.spec, rounded, tokens) if ref.stats is not None else None
    kappa = reference.condition(ref.spec, ref.params, tokens, targets, draws, ref.perturbed, seed=case.seed)
    return replace(ref, tokens=tokens, targets=targets, draws=draws, logits=r.logits, loss=r.loss, grads=r.grads,
                   stats=stats, kappa=kappa)


def _checks(x: Run, y, art: Artifact, subject: str, pairwise: bool, names: tuple[str, str],
            kappa: dict | None = None) -> list[Check]:
    return compare_runs(x, y, case=art.case, subject=subject, device=art.meta["device"], dtype=art.dtype,
                        pairwise=pairwise, names=names, param_names=[p.name for p in param_table(art.spec)],
                        spec=art.spec, kappa=kappa)


def _label(arts: list[Artifact]) -> None:
    """backend/device, numbered where one case and dtype has several (e.g. torch/cuda from two machines)."""
    for group in {(a.case, a.dtype): None for a in arts}:
        members = [a for a in arts if (a.case, a.dtype) == group]
        base = [f"{a.meta['backend']}/{a.meta['device']}" for a in members]
        for i, (a, b) in enumerate(zip(members, base), 1):
            a.label = b if base.count(b) == 1 else f"{b} #{i}"


def compare(paths: Iterable[str | os.PathLike], weights: Iterable[str] = ()) -> Comparison:
    """Every artifact against the float64 reference, and every two of one case and dtype against
    each other (twice the bound). Artifacts of one case that disagree on checkpoint, spec version,
    model or inputs raise ArtifactError. `weights`: more places to look for real weights."""
    arts = [read(p) for p in paths]
    _label(arts)
    result = Comparison(arts, [])
    training = [a for a in arts if isinstance(a, TrajectoryArtifact)]
    for case in dict.fromkeys(a.case for a in training):
        compare_trajectory_group([a for a in training if a.case == case], result)
    models = [a for a in arts if not isinstance(a, TrajectoryArtifact)]
    for case in dict.fromkeys(a.case for a in models):
        group = [a for a in models if a.case == case]
        check_consistent(group)
        ref_case, why = locate_reference(group[0], weights)
        if why:
            result.notes.append(why)
        for dtype in sorted({a.dtype for a in group}, key=lambda d: (DTYPES + (d,)).index(d)):
            members = [a for a in group if a.dtype == dtype]
            first = members[0]
            ref = reference_for(ref_case, dtype, first.tokens, first.targets, first.draws) if ref_case else None
            for a in members:
                o = Outcome(case, a.label, a.meta["device"], dtype, "ran", synthetic=a.synthetic)
                if ref is None:
                    o.status, o.message = "not run", why
                else:
                    o.subject += " vs reference"
                    o.checks = _checks(a.run, ref, a, a.label, False, (a.label, "reference"))
                result.outcomes.append(o)
            for a, b in combinations(members, 2):
                subject = f"{a.label}~{b.label}"
                # each tensor's bound rests on its condition estimate where the reference is here (SPEC.md 9)
                checks = _checks(a.run, b.run, a, subject, True, (a.label, b.label), ref.kappa if ref else None)
                result.outcomes.append(Outcome(case, subject, f"{a.meta['device']}/{b.meta['device']}", dtype,
                                               "ran", checks, synthetic=a.synthetic))
    return result


def locate_trajectory(art: TrajectoryArtifact) -> tuple[TrajectoryCase | None, str]:
    """The trajectory case of the artifact, rebuilt here, or None and why not: its model, training run,
    starting weights (fingerprint) and batches must be those recorded."""
    skipped = f"trajectory comparison skipped for {art.case} ({art.path})"
    try:
        fields = json.loads(art.meta["case_fields"])
        case = TrajectoryCase(**dict(fields, precisions=tuple(fields.get("precisions", ()))))
        spec, train_spec = case.spec, case.train_spec(art.dtype)
    except (TypeError, ValueError, SpecError, WeightsError) as e:
        return None, f"{skipped}: its case_fields are not understood here ({e})"
    if spec != art.spec:
        return None, f"{skipped}: the case builds a different model_spec here"
    if train_spec != art.train_spec:
        return None, f"{skipped}: the case's training run differs here: {train_spec.to_json()} vs {art.meta['train_spec']}"
    fp = fingerprint(spec, case.params())
    if fp != art.meta["fingerprint"]:
        return None, f"{skipped}: its starting weights differ here ({fp[:23]}... vs {art.meta['fingerprint'][:23]}...)"
    digest = inputs_digest(case)
    if digest != art.meta["inputs_digest"]:
        return None, f"{skipped}: its batches differ here ({digest[:23]}... vs {art.meta['inputs_digest'][:23]}...)"
    return case, ""


def compare_trajectory_group(group: list[TrajectoryArtifact], result: Comparison) -> None:
    """Trajectory artifacts of one case: each against the float64 reference, recomputed here from the
    case, and every two of one precision against each other, under the trajectory bounds."""
    first = group[0]
    for other in group[1:]:
        for key in ("spec_version", "fingerprint", "inputs_digest", "case_fields"):
            if first.meta.get(key) != other.meta.get(key):
                _refuse(first, other, f"they were written for different {key}: "
                                      f"{first.meta.get(key)} vs {other.meta.get(key)}")
    if first.meta["spec_version"] != SPEC_VERSION:
        raise ArtifactError(f"{first.path}: written for spec version {first.meta['spec_version']}, "
                            f"this gptspec implements {SPEC_VERSION}")
    case, why = locate_trajectory(first)
    if why:
        result.notes.append(why)
    for precision in dict.fromkeys(a.dtype for a in group):
        members = [a for a in group if a.dtype == precision]
        ref = reference_trajectory(case, precision) if case else None
        for a in members:
            o = Outcome(a.case, a.label, a.meta["device"], precision, "ran", kind="trajectory")
            if ref is None:
                o.status, o.message = "not run", why
            else:
                o.subject += " vs reference"
                o.checks = compare_trajectories(a.trajectory, ref, ref, case=a.case, subject=a.label,
                                                device=a.meta["device"], precision=precision, pairwise=False,
                                                names=(a.label, "reference"))
            result.outcomes.append(o)
        if ref is None:
            continue  # the pairwise checks need the starting weights and the reference's zero-gradient elements
        for a, b in combinations(members, 2):
            subject = f"{a.label}~{b.label}"
            device = f"{a.meta['device']}/{b.meta['device']}"
            checks = compare_trajectories(a.trajectory, b.trajectory, ref, case=a.case, subject=subject, device=device,
                                          precision=precision, pairwise=True, names=(a.label, b.label))
            result.outcomes.append(Outcome(a.case, subject, device, precision, "ran", checks, kind="trajectory"))


def compare_trajectory_with_local(art: TrajectoryArtifact, backends: list, device: str | None = None) -> list[Outcome]:
    """One trajectory artifact against the reference and against this machine's backends' runs of its case."""
    art.label = art.label or f"{art.meta['backend']}/{art.meta['device']}"
    case, why = locate_trajectory(art)
    if case is None:
        return [Outcome(art.case, art.label, art.meta["device"], art.dtype, "not run", message=why, kind="trajectory")]
    ref = reference_trajectory(case, art.dtype)
    common = dict(case=art.case, device=art.meta["device"], precision=art.dtype)
    outcomes = [Outcome(art.case, f"{art.label} vs reference", art.meta["device"], art.dtype, "ran",
                        compare_trajectories(art.trajectory, ref, ref, subject=art.label, pairwise=False,
                                             names=(art.label, "reference"), **common), kind="trajectory")]
    for b in backends:
        dev = device or b.devices()[0]
        local, subject = f"{b.name}/{dev} (here)", f"{art.label}~{b.name}/{dev} (here)"
        o = Outcome(art.case, subject, f"{art.meta['device']}/{dev}", art.dtype, "ran", kind="trajectory")
        if b.unsupported(ref.spec) or not trains(b):
            o.status = "not implemented"
            o.message = b.unsupported(ref.spec) or f"{b.name} does not train (SPEC.md 20)"
        else:
            run = cached_trajectory(b, case, ref, art.dtype, dev)
            o.checks = compare_trajectories(art.trajectory, run, ref, **dict(common, device=o.device), subject=subject,
                                            pairwise=True, names=(art.label, local))
        outcomes.append(o)
    return outcomes


_local_runs: dict[tuple, Run] = {}


def compare_with_local(art: Artifact, backends: list, device: str | None = None,
                       weights: Iterable[str] = ()) -> list[Outcome]:
    """One artifact against the reference and against this machine's backends on its inputs."""
    if isinstance(art, TrajectoryArtifact):
        return compare_trajectory_with_local(art, backends, device)
    art.label = art.label or f"{art.meta['backend']}/{art.meta['device']}"
    case, why = locate_reference(art, weights)
    if case is None:
        return [Outcome(art.case, art.label, art.meta["device"], art.dtype, "not run", message=why)]
    ref = reference_for(case, art.dtype, art.tokens, art.targets, art.draws)
    checks = _checks(art.run, ref, art, art.label, False, (art.label, "reference"))
    outcomes = [Outcome(art.case, f"{art.label} vs reference", art.meta["device"], art.dtype, "ran", checks,
                        synthetic=art.synthetic)]
    key = (case, art.dtype, art.tokens.tobytes(), art.targets.tobytes(),
           b"" if art.draws is None else art.draws.tobytes())
    for b in backends:
        dev = device or b.devices()[0]
        local, subject = f"{b.name}/{dev} (here)", f"{art.label}~{b.name}/{dev} (here)"
        o = Outcome(art.case, subject, f"{art.meta['device']}/{dev}", art.dtype, "ran", synthetic=art.synthetic)
        gap = backend_gap(b, ref.spec, art.dtype, dev)
        if gap:
            o.status, o.message = gap
        else:
            if any(k[2:] != key for k in _local_runs):  # keep the runs of one case and inputs only
                _local_runs.clear()
            if (b.name, dev) + key not in _local_runs:
                _local_runs[(b.name, dev) + key] = backend_run(b, ref, art.dtype, dev)
            run = _local_runs[(b.name, dev) + key]
            o.checks = _checks(art.run, run, art, subject, True, (art.label, local))
        outcomes.append(o)
    return outcomes
