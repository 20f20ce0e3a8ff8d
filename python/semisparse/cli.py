"""The ``semisparse`` command: info, demo, bench, prune, eval.

``prune --method`` is a pruning method (magnitude, wanda, sparsegpt), learned masks
(maskllm), block pruning (lpvit), or a factorisation: DSFormer (dsformer: ``W ~ S D``, S 2:4
sparse, optionally trained with STF) and its low-rank baseline (lowrank: ``W ~ U V``).

Every command prints what it is doing and exits non-zero with a one-line reason on bad
input (``semisparse <command>: error: ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

__all__ = ["main", "build_parser"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def _device(name: str) -> torch.device:
    try:
        d = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device: {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: torch sees no CUDA device")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return d


def _add_device_dtype(s: argparse.ArgumentParser, dtype_default: str = "fp32") -> None:
    s.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    s.add_argument("--dtype", choices=sorted(_DTYPES), default=dtype_default)


# --------------------------------------------------------------------- info
def _cmd_info(a) -> int:
    from .info import format_info, info

    d = info()
    print(json.dumps(d, indent=2) if a.json else format_info(d))
    return 0


# --------------------------------------------------------------------- demo
def _cmd_demo(a) -> int:
    from .demo import DemoConfig, run_demo

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.steps < 1:
        raise UsageError(f"--steps must be positive, got {a.steps}")
    cfg = DemoConfig(seed=a.seed, steps=a.steps, dtype=_DTYPES[a.dtype], device=str(_device(a.device)))
    if a.quick:
        cfg.train_sentences, cfg.heldout_sentences, cfg.steps, cfg.nsamples = 4000, 400, min(a.steps, 40), 16
        cfg.hidden, cfg.ffn, cfg.layers, cfg.heads, cfg.time_tokens = 64, 128, 2, 4, (1, 32)
    print(f"semisparse demo: train a small Llama on a synthetic language, prune it at {cfg.pattern} "
          f"with {', '.join(cfg.methods)}, compress it (seed {cfg.seed}, {cfg.device}, {a.dtype})")
    run_demo(cfg)
    return 0


# -------------------------------------------------------------------- bench
def _cmd_bench(a) -> int:
    if a.model:
        from .demo.speed import run_demo as speed_demo

        speed_demo(dtype=_DTYPES[a.dtype if a.dtype else "fp32"], reps=a.reps)
        return 0
    from .bench import run

    if _device(a.device).type != "cpu":
        raise UsageError(f"--device {a.device}: this milestone benchmarks the CPU kernels only "
                         f"(the CUDA 2:4 GEMM comes with the CUDA milestone)")
    if a.dtype:
        a.dtypes = a.dtype
    return run(a)


# -------------------------------------------------------------------- prune
def _load_model(path: str, device, dtype):
    from .hf import load_pretrained

    print(f"loading {path} ...", flush=True)
    return load_pretrained(path, device=device, dtype=dtype)


def _load_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("this command needs transformers (pip install transformers)") from None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise UsageError(f"cannot load a tokenizer from {path}: {e}".splitlines()[0]) from None


def _calib_tokens(a, tok):
    """``--nsamples`` windows of ``--seqlen`` tokens of the ``--calib`` text (``--seed``),
    ``LongTensor[nsamples, seqlen]``: the calibration or training data of ``prune``."""
    from .data import calibration_samples, load_text

    text = load_text(a.calib, split=a.split, download=a.download)
    return calibration_samples(text, tok, a.nsamples, a.seqlen, seed=a.seed)


def _eval_ids(a, tok):
    """The ``--eval-data`` tokens (the first ``--eval-tokens``), or None without --eval-data."""
    from .data import eval_tokens, load_text

    if not a.eval_data:
        return None
    ids = eval_tokens(load_text(a.eval_data, split=a.split, download=a.download), tok)
    return ids[:, : a.eval_tokens] if a.eval_tokens else ids


def _token_batches(data, batch_size: int) -> list[dict]:
    """Token ids ``[n, seqlen]`` -> ``{"input_ids": [batch_size, seqlen]}`` micro-batches."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if data.shape[0] < batch_size:
        raise UsageError(f"--nsamples {data.shape[0]} is smaller than --batch-size {batch_size}")
    return [{"input_ids": data[i : i + batch_size]} for i in range(0, data.shape[0] - batch_size + 1, batch_size)]


def _train_config(a, desc: str):
    """The :class:`semisparse.train.TrainConfig` of ``prune``'s training flags (--steps,
    --lr, --grad-accum, --autocast, --seed, --eval-every, --checkpoint-dir,
    --checkpoint-every, --metrics)."""
    from .train import TrainConfig

    return TrainConfig(steps=a.steps, lr=a.lr, grad_accum=a.grad_accum, autocast=a.autocast, seed=a.seed,
                       eval_every=a.eval_every, checkpoint_dir=a.checkpoint_dir, checkpoint_every=a.checkpoint_every,
                       metrics_path=a.metrics, desc=desc)


def _check_out_free(a) -> None:
    if os.path.exists(a.out) and not a.overwrite:
        raise UsageError(f"--out {a.out} exists (pass --overwrite to replace it)")


def _cmd_prune(a) -> int:
    import semisparse
    from .hf import save_pretrained
    from .masks import save_masks

    device, dtype = _device(a.device), _DTYPES[a.dtype]
    methods = (*semisparse.pruning.METHODS, "maskllm", "lpvit", *_FACTORIZE_METHODS)
    if a.method not in methods:
        raise UsageError(f"--method must be one of {', '.join(methods)}, got {a.method!r}")
    if a.method == "lpvit":  # block pruning: --pattern does not apply
        return _prune_lpvit(a, device, dtype)
    if a.method in _FACTORIZE_METHODS:
        return _prune_factorize(a, device, dtype)
    if a.k is not None or a.compression is not None or a.init is not None or a.distill is not None \
            or a.freeze_mask_steps is not None or a.blocks is not None:
        raise UsageError(f"--k, --compression, --init, --blocks, --distill and --freeze-mask-steps are for --method "
                         f"dsformer / lowrank, not {a.method}")
    if a.pattern is None:
        a.pattern = "2:4"
    semisparse.parse_pattern(a.pattern)  # raises ValueError listing the valid forms
    if a.method == "maskllm":
        if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
            torch.cuda.set_device(device)
        return _prune_maskllm(a, device, dtype)
    needs_calib = a.method != "magnitude"
    if needs_calib and not a.calib:
        raise UsageError(f"--method {a.method} needs --calib (a text file, a folder of text files or a dataset)")
    model = _load_model(a.model, device, dtype)
    # the tokenizer travels with the pruned model; only the calibration needs it
    try:
        tok = _load_tokenizer(a.model)
    except UsageError:
        if needs_calib:
            raise
        tok = None
        print(f"note: no tokenizer in {a.model}; the output folder will have none")
    calib = None
    if needs_calib:
        calib = _calib_tokens(a, tok)
        print(f"calibration: {a.nsamples} x {a.seqlen} tokens from {a.calib} (seed {a.seed})")
    t0 = time.perf_counter()
    options = {}
    if a.method == "sparsegpt":
        options = {"update": not a.no_update, "damp": a.damp, "blocksize": a.blocksize}
    masks = semisparse.prune(model, a.method, pattern=a.pattern, calib=calib, targets=a.targets,
                             exclude=a.exclude, strict=a.strict, **options)
    print(f"pruned {len(masks)} layers with {a.method} at {a.pattern} in {time.perf_counter() - t0:.1f} s")
    meta = {"method": a.method, "pattern": a.pattern, "calib": a.calib, "nsamples": a.nsamples,
            "seqlen": a.seqlen, "seed": a.seed, "options": options}
    save_pretrained(model, a.out, tokenizer=tok, compress=a.compress, masks=masks, metadata=meta,
                    overwrite=a.overwrite)
    print(f"wrote {a.out} ({'compressed 2:4 weights' if a.compress else 'masked dense weights'})")
    if a.masks_out:
        save_masks(masks, a.masks_out, metadata=meta)
        print(f"wrote masks to {a.masks_out}")
    return 0


def _pair(text: str, flag: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} must be START,END (two numbers), got {text!r}") from None
    return a, b


def _prune_maskllm(a, device, dtype) -> int:
    """``semisparse prune --method maskllm``: learn the masks (frozen weights) on --calib text."""
    from . import maskllm
    from .hf import save_pretrained
    from .masks import save_masks

    if a.steps is None:
        a.steps = 200
    if not a.calib:
        raise UsageError("--method maskllm needs --calib (the training text: a file, a folder or a dataset)")
    prior = None if a.prior == "none" else a.prior
    if prior is not None and prior not in maskllm.PRIORS and not os.path.isfile(prior):
        raise UsageError(f"--prior must be none, {', '.join(maskllm.PRIORS)} or a masks file, got {a.prior!r}")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    cfg = maskllm.MaskLLMConfig(
        pattern=a.pattern, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
        tau=_pair(a.tau, "--tau"), kappa=_pair(a.kappa, "--kappa"), schedule=a.schedule, prior=prior,
        prior_strength=a.prior_strength, prior_nsamples=min(a.nsamples, 128), reg_lambda=a.reg_lambda, loss=a.loss,
        prior_options={"damp": a.damp, "blocksize": a.blocksize} if a.prior == "sparsegpt" else {},
        logits_dtype=a.logits_dtype, train_weights=a.train_weights, targets=a.targets, exclude=a.exclude,
        seed=a.seed, eval_every=a.eval_every, checkpoint_dir=a.checkpoint_dir, checkpoint_every=a.checkpoint_every,
        metrics_path=a.metrics, autocast=a.autocast,
    )
    _check_out_free(a)
    model = _load_model(a.model, device, dtype)
    tok = _load_tokenizer(a.model)
    data = _calib_tokens(a, tok)
    print(f"training data: {a.nsamples} x {a.seqlen} tokens from {a.calib}; {a.steps} steps x "
          f"{a.batch_size * a.grad_accum} sequences; prior {a.prior}")
    eval_ids = _eval_ids(a, tok)
    t0 = time.perf_counter()
    res = maskllm.train_masks(model, data, cfg, eval_data=eval_ids, eval_seqlen=a.seqlen)
    print(f"learned {len(res.masks)} masks in {time.perf_counter() - t0:.1f} s ({res.steps} steps"
          + (f", resumed from step {res.resumed_from}" if res.resumed_from else "") + ")")
    if res.last_eval:
        print("evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in res.last_eval.items()))
    if res.changed:
        mean = sum(res.changed.values()) / len(res.changed)
        print(f"groups whose pattern differs from the prior: {100 * mean:.2f}% (mean over layers)")
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 writes
        return 0
    masks = maskllm.remove_masks(model, apply=True)
    meta = {"method": "maskllm", "pattern": a.pattern, "calib": a.calib, "nsamples": a.nsamples, "seqlen": a.seqlen,
            "seed": a.seed, "options": {"steps": a.steps, "prior": a.prior, "lr": a.lr, "batch_size": a.batch_size,
                                        "grad_accum": a.grad_accum, "tau": a.tau, "kappa": a.kappa, "loss": a.loss,
                                        "logits_dtype": a.logits_dtype}}
    save_pretrained(model, a.out, tokenizer=tok, compress=a.compress, masks=masks, metadata=meta, overwrite=a.overwrite)
    print(f"wrote {a.out} ({'compressed 2:4 weights' if a.compress else 'masked dense weights'})")
    if a.masks_out:
        save_masks(masks, a.masks_out, metadata=meta)
        print(f"wrote masks to {a.masks_out}")
    if a.task_masks_out:
        maskllm.save_task_masks(masks, a.task_masks_out, pattern=a.pattern, metadata=meta)
        print(f"wrote compact task masks to {a.task_masks_out}")
    if a.plot:
        from .maskllm.plots import plot_run

        for p in plot_run(res.history, res.changed, a.plot):
            print(f"wrote {p}")
    return 0


_FACTORIZE_METHODS = ("dsformer", "lowrank")


def _factorize_options(a) -> dict:
    """Check the dsformer / lowrank flags (before anything is loaded); the resolved options."""
    from .dsformer import parse_pattern as nm_pattern

    lowrank = a.method == "lowrank"
    if a.k is not None and a.compression is not None:
        raise UsageError("give --k or --compression, not both (--k fixes the inner dimension of every layer, "
                         "--compression picks the largest k within the budget of each layer)")
    if a.compression is not None and not a.compression > 1:
        raise UsageError(f"--compression must be a number > 1 (weights before / after), got {a.compression}")
    if a.steps is None:
        a.steps = 0
    if a.steps < 0:
        raise UsageError(f"--steps must be >= 0 (0: factorise only), got {a.steps}")
    for path, flag in ((a.masks_out, "--masks-out"), (a.task_masks_out, "--task-masks-out"), (a.plot, "--plot")):
        if path:
            raise UsageError(f"{flag} does not apply to --method {a.method} (a factorised model has no weight masks)")
    _check_out_path(a.report, "--report")
    if lowrank:
        if a.k is not None:
            raise UsageError("--k is for --method dsformer; --method lowrank takes --compression (each layer gets "
                             "the largest rank within the budget)")
        if a.pattern is not None:
            raise UsageError(f"--pattern does not apply to --method lowrank (dense factors), got {a.pattern!r}")
        if a.init not in (None, "svd"):
            raise UsageError(f"--method lowrank is initialised by truncated SVD; --init {a.init} is for dsformer")
        if a.freeze_mask_steps is not None:
            raise UsageError("--freeze-mask-steps is for --method dsformer (low-rank factors have no mask)")
        if a.blocks is not None:
            raise UsageError("--blocks is for --method dsformer (per-row-block bases of D; a low-rank layer has one "
                             f"basis), got --blocks {a.blocks}")
        pattern, init, blocks = None, "svd", 1
    else:
        pattern = "2:4" if a.pattern is None else a.pattern
        try:
            n, m = nm_pattern(pattern)
        except ValueError:
            raise UsageError(f"--pattern must be N:M with integers 0 < N < M for --method dsformer (S is N:M sparse "
                             f"along k; 2:4 can be compressed), got {pattern!r}") from None
        pattern = f"{n}:{m}"
        init = a.init or "svd"
        if init not in ("svd", "data"):
            raise UsageError(f"--init must be svd or data, got {init!r}")
        if init == "data" and not a.calib:
            raise UsageError("--init data needs --calib (the text whose activations weight the factorisation)")
        if a.k is not None and (a.k < 1 or a.k % m):
            raise UsageError(f"--k must be a positive multiple of M={m} (S is {pattern} sparse along k), got {a.k}")
        blocks = 1 if a.blocks is None else a.blocks.strip()
        if blocks != 1 and blocks != "heads":
            if not blocks.isdigit() or int(blocks) < 1:
                raise UsageError(f"--blocks must be a positive integer (row blocks per layer, each with its own "
                                 f"basis) or 'heads', got {a.blocks!r}")
            blocks = int(blocks)
    if a.steps == 0:
        for value, flag in ((a.distill, "--distill"), (a.freeze_mask_steps, "--freeze-mask-steps"),
                            (a.checkpoint_dir, "--checkpoint-dir"), (a.eval_every, "--eval-every")):
            if value is not None:
                raise UsageError(f"{flag} needs training: pass --steps N (N > 0) with --calib")
    else:
        if not a.calib:
            raise UsageError(f"--steps {a.steps} needs --calib (the training text: a file, a folder or a dataset)")
        if a.distill is not None and not 0.0 <= a.distill <= 1.0:
            raise UsageError(f"--distill (the weight of the KL to the dense model) must be in [0, 1], got {a.distill}")
        if not lowrank:
            if a.freeze_mask_steps is None:
                a.freeze_mask_steps = int(0.1 * a.steps + 0.5)
            if not 0 <= a.freeze_mask_steps <= a.steps:
                raise UsageError(f"--freeze-mask-steps must be in [0, --steps {a.steps}], got {a.freeze_mask_steps}")
        _train_config(a, a.method)  # bad --lr, --grad-accum, ...: fail before the model is loaded
    compression = None if a.k is not None else (a.compression if a.compression is not None else 2.0)
    return {"pattern": pattern, "init": init, "k": a.k, "compression": compression, "blocks": blocks,
            "distill": a.distill or 0.0, "freeze_mask_steps": a.freeze_mask_steps or 0}


def _factorize_report_json(report, a, opts, train_info) -> dict:
    return {
        "method": a.method, "model": a.model, "pattern": opts["pattern"], "init": opts["init"],
        "compression_target": opts["compression"], "k": opts["k"], "blocks": opts["blocks"],
        "compression": report.compression, "params_before": report.params_before, "params_after": report.params_after,
        "model_params_before": report.model_params_before, "model_params_after": report.model_params_after,
        "layers": [{"name": name, "shape": list(v.shape), "k": v.k, "blocks": v.blocks, "params_before": v.params_before,
                    "params_after": v.params_after, "init_error": v.init_error} for name, v in report.layers.items()],
        "skipped": dict(report.skipped), "training": train_info,
    }


def _prune_factorize(a, device, dtype) -> int:
    """``semisparse prune --method dsformer | lowrank``: factorise the selected Linear layers
    (DSFormer ``W ~ S D`` with S N:M sparse, or the low-rank baseline ``W ~ U V``) at
    --compression (or --k), optionally train them --steps on --calib text (STF for dsformer;
    --distill adds a KL to the dense model), compress the 2:4 layers and save the folder."""
    import copy

    from . import dsformer
    from .eval import perplexity
    from .hf import save_pretrained
    from .io import atomic_write_bytes
    from .train.outputs import is_causal_lm

    opts = _factorize_options(a)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
    _check_out_free(a)
    model = _load_model(a.model, device, dtype)
    needs_tok = bool(a.calib or a.eval_data)
    try:
        tok = _load_tokenizer(a.model)
    except UsageError:
        if needs_tok:
            raise
        tok = None
        print(f"note: no tokenizer in {a.model}; the output folder will have none")
    train = a.steps > 0
    if train and opts["distill"] < 1 and not is_causal_lm(model):
        raise UsageError(f"--steps: {type(model).__name__} has no language-model loss; train it with --distill 1 "
                         "(KL to the dense model only)")
    data = None
    if a.calib:
        data = _calib_tokens(a, tok)
        print(f"calibration: {a.nsamples} x {a.seqlen} tokens from {a.calib} (seed {a.seed})")
    eval_ids = _eval_ids(a, tok)
    batches = _token_batches(data, a.batch_size) if data is not None else None
    teacher = None
    if train and opts["distill"] > 0:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)

    t0 = time.perf_counter()
    if a.method == "lowrank":
        report = dsformer.lowrank(model, compression=opts["compression"], targets=a.targets, exclude=a.exclude)
    else:
        report = dsformer.factorize(model, compression=opts["compression"], k=opts["k"], pattern=opts["pattern"],
                                    targets=a.targets, exclude=a.exclude, init=opts["init"],
                                    calib=batches if opts["init"] == "data" else None, blocks=opts["blocks"])
    if a.strict and report.skipped:
        raise UsageError(f"--strict: {len(report.skipped)} layer(s) not factorised: "
                         + "; ".join(f"{n}: {r}" for n, r in report.skipped.items()))
    print(f"factorised {len(report.layers)} layers with {a.method} in {time.perf_counter() - t0:.1f} s")
    print(report.table())

    def ppl(mdl):
        return perplexity(mdl, eval_ids, seqlen=a.seqlen, progress=False)

    train_info = {"steps": a.steps}
    if eval_ids is not None:
        train_info["eval_ppl_factorised"] = ppl(model)
        print(f"evaluation: perplexity {train_info['eval_ppl_factorised']:.4f} after factorisation")
    if train:
        cfg = _train_config(a, a.method)
        eval_fn = (lambda mdl, step: {"ppl": ppl(mdl)}) if eval_ids is not None and a.eval_every else None
        print(f"training: {a.steps} steps x {a.batch_size * a.grad_accum} sequences of {a.seqlen} tokens, lr {a.lr}"
              + (f", distill {opts['distill']}" if opts["distill"] else "")
              + (f", masks frozen for the last {opts['freeze_mask_steps']} steps" if a.method == "dsformer" else ""))
        t0 = time.perf_counter()
        if a.method == "dsformer":
            res = dsformer.train_stf(model, batches, cfg, teacher=teacher, distill=opts["distill"],
                                     freeze_mask_steps=opts["freeze_mask_steps"], compress=False, eval_fn=eval_fn)
        else:
            def loss_fn(mdl, batch, info):
                return dsformer.stf_loss(mdl, batch, teacher, opts["distill"])

            from .train import train as train_loop

            res = train_loop(model, batches, loss_fn, cfg, eval_fn=eval_fn)
        losses = [h["loss"] for h in res.history if "loss" in h]
        train_info.update(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                          resumed_from=res.resumed_from, seconds=time.perf_counter() - t0)
        print(f"trained {res.step} steps in {train_info['seconds']:.1f} s"
              + (f" (resumed from step {res.resumed_from})" if res.resumed_from else "")
              + (f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""))
    model.eval()
    exported = dsformer.export(model) if a.method == "dsformer" else []
    if a.method == "dsformer":
        print(f"compressed {len(exported)} of {len(report.layers)} layers to 2:4"
              + ("" if len(exported) == len(report.layers) else f" (pattern {opts['pattern']}: masks frozen instead)"))
    if eval_ids is not None and (train or exported):
        train_info["eval_ppl"] = ppl(model)
        print(f"evaluation: perplexity {train_info['eval_ppl']:.4f}")

    meta = {"method": a.method, "pattern": opts["pattern"], "compression": opts["compression"], "k": opts["k"],
            "blocks": opts["blocks"],
            "init": opts["init"], "calib": a.calib, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed,
            "targets": a.targets, "exclude": a.exclude,
            "options": {"steps": a.steps, "lr": a.lr, "batch_size": a.batch_size, "grad_accum": a.grad_accum,
                        "distill": opts["distill"], "freeze_mask_steps": opts["freeze_mask_steps"]},
            "achieved_compression": report.compression}
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 writes
        return 0
    save_pretrained(model, a.out, tokenizer=tok, compress=True, metadata=meta, overwrite=a.overwrite)
    print(f"wrote {a.out} ({len(report.layers)} {a.method} layers"
          + (f", {len(exported)} compressed 2:4" if a.method == "dsformer" else "") + ")")
    if a.report:
        base, ext = os.path.splitext(a.report)
        txt = (base if ext.lower() == ".json" else a.report) + ".txt"
        summary = _factorize_report_json(report, a, opts, train_info)
        atomic_write_bytes(a.report, (json.dumps(summary, indent=2) + "\n").encode())
        atomic_write_bytes(txt, (report.table() + "\n").encode())
        print(f"wrote {a.report} and {txt}")
    return 0


def _block(text: str) -> tuple[int, int]:
    """``"RxC"`` (or ``"N"`` for NxN) -> (R, C), positive integers."""
    parts = text.lower().split("x")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        vals = tuple(int(v) for v in parts)
    except ValueError:
        vals = ()
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"--block must be ROWSxCOLS of positive integers (e.g. 32x32), got {text!r}")
    return (vals[0], vals[0]) if len(vals) == 1 else vals


class _CopyFiles:
    """Something with ``save_pretrained(dir)`` that copies files of the input model folder
    (e.g. its ``preprocessor_config.json``) byte for byte into the output folder, so that
    they land in ``save_pretrained``'s temporary folder and the folder appears whole."""

    def __init__(self, src: str, names: list[str]):
        self.src, self.names = src, names

    def save_pretrained(self, out_dir) -> None:
        import shutil

        for name in self.names:
            shutil.copyfile(os.path.join(self.src, name), os.path.join(out_dir, name))


def _check_out_path(path: str | None, flag: str) -> None:
    if path and os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; expected a file path")


def _lpvit_report_json(report, a, block) -> dict:
    return {
        "method": "lpvit", "model": a.model, "block": list(block), "flops_target": report.target,
        "kept_flops": report.kept_flops, "power": report.power, "beta": report.beta, "allocation": a.allocation,
        "max_sparsity": a.max_sparsity, "calib": a.calib, "nsamples": a.nsamples, "seed": a.seed,
        "layers": [{"name": r.name, "kind": r.kind, "shape": list(r.shape), "blocks": r.blocks,
                    "pruned_blocks": r.pruned_blocks, "sparsity": r.sparsity, "flops": r.flops}
                   for r in report.layers],
    }


def _prune_lpvit(a, device, dtype) -> int:
    """``semisparse prune --method lpvit``: LPViT block pruning of an image model at a FLOPs
    target, calibrated (label-free) on --calib images; writes a plain Hugging Face folder
    with the pruned blocks zeroed."""
    from . import lpvit
    from .data import load_calibration_images
    from .hf import save_pretrained
    from .io import atomic_write_bytes
    from .lpvit.calibrate import find_layers
    from .lpvit.prune import expand
    from .masks import save_masks

    block = _block(a.block)
    if not 0 < a.flops <= 1:
        raise UsageError(f"--flops (the fraction of FLOPs kept) must be in (0, 1], got {a.flops}")
    if not 0 < a.max_sparsity <= 1:
        raise UsageError(f"--max-sparsity must be in (0, 1], got {a.max_sparsity}")
    power = None if a.power == "none" else a.power
    if power not in lpvit.POWER:
        raise UsageError(f"--power must be none, analytical or measured, got {a.power!r}")
    if a.allocation not in lpvit.ALLOCATIONS:
        raise UsageError(f"--allocation must be one of {', '.join(lpvit.ALLOCATIONS)}, got {a.allocation!r}")
    if a.nsamples < 1 or a.batch_size < 1:
        raise UsageError(f"--nsamples and --batch-size must be positive, got {a.nsamples} and {a.batch_size}")
    if a.compress:
        raise UsageError("--compress stores 2:4 layers; --method lpvit writes masked dense weights (drop --compress)")
    if not a.calib:
        raise UsageError("--method lpvit needs --calib (a folder of images, or digits)")
    if os.path.exists(a.out) and not a.overwrite:
        raise UsageError(f"--out {a.out} exists (pass --overwrite to replace it)")
    for path, flag in ((a.masks_out, "--masks-out"), (a.report, "--report")):
        _check_out_path(path, flag)
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None

    if not os.path.isdir(a.model):
        raise UsageError(f"--model {a.model}: no such folder (expected a Hugging Face model folder)")
    # the images first: bad data fails before the model is loaded
    calib = load_calibration_images(a.calib, model_dir=a.model, nsamples=a.nsamples, batch_size=a.batch_size,
                                    seed=a.seed)
    shape = tuple(calib[0].shape[1:])
    print(f"calibration: {a.nsamples} images {shape[1]}x{shape[2]}x{shape[0]} from {a.calib} (seed {a.seed}), "
          f"batches of {a.batch_size}")
    model = _load_model(a.model, device, dtype)
    layers = find_layers(model, a.targets, a.exclude)  # ValueError when nothing is prunable
    bad = [lay for lay in layers if lay.shape[0] % block[0] or lay.shape[1] % block[1]]
    if bad:
        listed = ", ".join(f"{lay.name} {lay.shape[0]}x{lay.shape[1]}" for lay in bad[:6])
        listed += " ..." if len(bad) > 6 else ""
        names = " ".join(lay.name for lay in bad)
        keep = " ".join(a.exclude or [])
        raise UsageError(f"lpvit: block {block[0]}x{block[1]} does not divide {len(bad)} layer(s): {listed}; "
                         f"leave them dense with --exclude {(keep + ' ' + names).strip()}, or choose another --block")
    calib = [x.to(device=device, dtype=dtype) for x in calib]
    t0 = time.perf_counter()
    try:
        report = lpvit.prune(model, calib, block=block, flops=a.flops, power=power, max_sparsity=a.max_sparsity,
                             targets=a.targets, exclude=a.exclude, allocation=a.allocation)
    except ValueError as e:  # the library's hints name its keyword; the command's is --exclude
        raise UsageError(str(e).replace("exclude=[...]", "--exclude NAME ...")) from None
    print(f"pruned {len(report.layers)} layers in {block[0]}x{block[1]} blocks in {time.perf_counter() - t0:.1f} s")
    print(report.table())

    summary = _lpvit_report_json(report, a, block)
    meta = {"method": "lpvit", "block": list(block), "flops": a.flops, "kept_flops": report.kept_flops,
            "power": a.power, "allocation": a.allocation, "max_sparsity": a.max_sparsity, "calib": a.calib,
            "nsamples": a.nsamples, "seed": a.seed,
            "sparsity": {r.name: r.sparsity for r in report.layers}}
    elem_masks = {}
    for name, bmask in report.masks.items():
        w = model.get_submodule(name).weight
        elem_masks[name] = expand(bmask, block).reshape(w.shape)
    extra = [f for f in ("preprocessor_config.json",) if os.path.isfile(os.path.join(a.model, f))]
    save_pretrained(model, a.out, tokenizer=_CopyFiles(a.model, extra) if extra else None, compress=False,
                    masks=elem_masks, metadata=meta, overwrite=a.overwrite)
    print(f"wrote {a.out} (masked dense weights{', with ' + ', '.join(extra) if extra else ''})")
    if a.masks_out:
        save_masks(report.masks, a.masks_out, metadata={**meta, "layers": sorted(report.masks), "kind": "block"})
        print(f"wrote block masks to {a.masks_out}")
    if a.report:
        base, ext = os.path.splitext(a.report)
        txt = (base if ext.lower() == ".json" else a.report) + ".txt"
        atomic_write_bytes(a.report, (json.dumps(summary, indent=2) + "\n").encode())
        atomic_write_bytes(txt, (report.table() + "\n").encode())
        print(f"wrote {a.report} and {txt}")
    if a.plot:
        png = a.plot if a.plot.lower().endswith(".png") else os.path.join(a.plot, "lpvit_sparsity.png")
        report.plot(png)
        print(f"wrote {png}")
    return 0


# --------------------------------------------------------------------- eval
def _cmd_eval(a) -> int:
    from .data import eval_tokens, load_text
    from .eval import fidelity, perplexity

    device, dtype = _device(a.device), _DTYPES[a.dtype]
    model = _load_model(a.model, device, dtype)
    tok = _load_tokenizer(a.tokenizer or a.model)
    text = load_text(a.data, split=a.split, download=a.download)
    tokens = eval_tokens(text, tok)
    if a.max_tokens:
        tokens = tokens[:, : a.max_tokens]
    if a.reference:
        ref = _load_model(a.reference, device, dtype)
        f = fidelity(model, ref, tokens, seqlen=a.seqlen)
        print(f"fidelity (mean cosine of last hidden states vs {a.reference}): {f:.6f} on {tokens.numel()} tokens")
        return 0
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UsageError(f"{a.model} has no language-model head: pass --reference DENSE_DIR for fidelity")
    ppl = perplexity(model, tokens, seqlen=a.seqlen, stride=a.stride)
    print(f"perplexity: {ppl:.4f} on {tokens.numel()} tokens (window {a.seqlen}, stride {a.stride or a.seqlen})")
    return 0


# ------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semisparse", description="Semi-structured sparsity for PyTorch transformers.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="native libraries, CPU SIMD path, CUDA kernels and why not")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("demo", help="train a small model on a synthetic language, prune it three ways, compress it")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=1200, help="training steps")
    s.add_argument("--quick", action="store_true", help="a much smaller run (seconds), for smoke tests")
    s.add_argument("--threads", type=int, default=None)
    _add_device_dtype(s)
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("bench", help="the CPU 2:4 kernel benchmark table (dense, CSR, ours)")
    from .bench import add_arguments

    add_arguments(s)
    s.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="one dtype instead of --dtypes")
    s.add_argument("--model", action="store_true", help="time a built-in random-weight decoder instead")
    s.add_argument("--device", default="cpu", help="cpu (the CUDA kernels are not benchmarked yet)")
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("prune", help="prune a Hugging Face model and save it")
    s.add_argument("--model", required=True, help="a local Hugging Face model folder")
    s.add_argument("--method", required=True,
                   help="magnitude | wanda | sparsegpt | maskllm (learned masks) | lpvit (block pruning, image models) "
                        "| dsformer (W ~ S D factorisation, S 2:4) | lowrank (W ~ U V baseline)")
    s.add_argument("--pattern", default=None,
                   help="N:M (2:4, 1:4, 4:8) or unstructured:<ratio> (default 2:4); dsformer: N:M of S along k")
    s.add_argument("--calib", default=None, help="text file, folder of text files, or dataset (wikitext2, c4, "
                   "hf:NAME...); lpvit: a folder of images or digits (scikit-learn's)")
    s.add_argument("--nsamples", type=int, default=128)
    s.add_argument("--seqlen", type=int, default=2048)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output folder (written only if the run succeeds)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.add_argument("--compress", action="store_true", help="store 2:4 layers compressed (SparseLinear)")
    s.add_argument("--masks-out", default=None,
                   help="also write the masks (bit-packed safetensors; lpvit: the block masks)")
    s.add_argument("--targets", nargs="*", default=None, help="module name patterns to prune")
    s.add_argument("--exclude", nargs="*", default=None, help="module name patterns to leave dense")
    s.add_argument("--strict", action="store_true", help="error instead of skipping layers that do not fit the pattern")
    s.add_argument("--damp", type=float, default=0.01, help="SparseGPT damping (fraction of mean diag)")
    s.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    s.add_argument("--no-update", action="store_true", help="SparseGPT without the weight update (mask only)")
    s.add_argument("--split", default=None, help="dataset split for a dataset --calib (default: train)")
    s.add_argument("--download", action="store_true", help="let a dataset --calib be downloaded (default: local cache only)")
    g = s.add_argument_group("maskllm (learned masks; --calib is the training text, --nsamples its sequences)")
    g.add_argument("--prior", default="sparsegpt", help="none | magnitude | wanda | sparsegpt | a masks file (transfer)")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (maskllm: default 200; dsformer/lowrank: default 0 = factorise only)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (lpvit: images per batch)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=5e-4,
                   help="AdamW learning rate (cosine to 5e-6): maskllm on the logits, dsformer/lowrank on the factors")
    g.add_argument("--tau", default="4,0.05", help="Gumbel temperature START,END")
    g.add_argument("--kappa", default="100,500", help="logit scale START,END")
    g.add_argument("--schedule", default="linear", help="tau/kappa schedule: linear | exp | cosine | constant")
    g.add_argument("--prior-strength", type=float, default=3.0, help="alpha")
    g.add_argument("--reg-lambda", type=float, default=1e-5, help="sparse weight regulariser (decays to 0)")
    g.add_argument("--loss", default="auto", help="auto | lm | kl | mse (distillation from the dense model)")
    g.add_argument("--logits-dtype", default="float32", help="float32 | bfloat16 (half the training memory)")
    g.add_argument("--train-weights", action="store_true", help="also train the kept weights")
    g.add_argument("--autocast", default="auto", help="auto (bf16 on CUDA) | bf16 | off")
    g.add_argument("--eval-data", default=None, help="held-out text: perplexity with the argmax masks")
    g.add_argument("--eval-tokens", type=int, default=None, help="evaluate on the first N held-out tokens")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (and at the end)")
    g.add_argument("--checkpoint-dir", default=None, help="checkpoints (resumed from when present)")
    g.add_argument("--checkpoint-every", type=int, default=None)
    g.add_argument("--metrics", default=None, help="metrics JSONL (default: <checkpoint-dir>/metrics.jsonl)")
    g.add_argument("--task-masks-out", default=None, help="also write the masks compactly (0.67 bits per weight)")
    g.add_argument("--plot", default=None, help="maskllm: a folder for PNGs of loss, eval perplexity and changes vs "
                   "the prior; lpvit: a PNG of the per-layer sparsity (FILE.png, or a folder for lpvit_sparsity.png)")
    g = s.add_argument_group("lpvit (block pruning of image models; --calib is a folder of images or digits, "
                             "--nsamples the images; also --batch-size, --plot, --targets, --exclude, --masks-out)")
    g.add_argument("--block", default="32x32", help="block shape ROWSxCOLS (default 32x32)")
    g.add_argument("--flops", type=float, default=0.5,
                   help="fraction of the pruned layers' FLOPs kept, in (0, 1] (default 0.5)")
    g.add_argument("--power", default="none",
                   help="hardware term: none (default) | analytical | measured (our kernel's time)")
    g.add_argument("--allocation", default="lpvit",
                   help="lpvit (default: per layer, by distortion) | uniform (the same sparsity everywhere)")
    g.add_argument("--max-sparsity", type=float, default=0.95,
                   help="largest fraction of blocks pruned in any one layer (default 0.95)")
    g.add_argument("--report", default=None,
                   help="write the per-layer sparsity as JSON here (FILE.json) and the table next to it (FILE.txt)")
    g = s.add_argument_group("dsformer / lowrank (factorise the Linear layers; also --pattern, --targets, --exclude, "
                             "--strict, --report, and for training --steps on --calib with --batch-size, --grad-accum, "
                             "--lr, --autocast, --eval-data, --eval-every, --checkpoint-dir, --metrics)")
    g.add_argument("--compression", type=float, default=None,
                   help="weights before / after of every factorised layer, > 1 (default 2.0); the largest k (rank) "
                        "within that budget")
    g.add_argument("--k", type=int, default=None, help="dsformer: one inner dimension k for every layer (a multiple "
                   "of M) instead of --compression")
    g.add_argument("--init", default=None, help="dsformer: svd (default, task-unaware) | data (weighted by the "
                   "--calib activations)")
    g.add_argument("--blocks", default=None,
                   help="dsformer: split each layer's output rows into N equal blocks, each with its own basis "
                        "(default 1; layers N does not divide are skipped), or 'heads': one basis per attention "
                        "head for the q/k/v/o projections (from the model config), 1 elsewhere")
    g.add_argument("--freeze-mask-steps", type=int, default=None,
                   help="dsformer: freeze S's mask for the last N training steps (default 10%% of --steps)")
    g.add_argument("--distill", type=float, default=None,
                   help="weight in [0, 1] of the KL to the dense model (the teacher) in the training loss (default 0)")
    _add_device_dtype(s)
    s.set_defaults(fn=_cmd_prune)

    s = sub.add_parser("eval", help="perplexity (or fidelity to a dense reference) of a model")
    s.add_argument("--model", required=True, help="a local model folder (plain or saved by semisparse prune)")
    s.add_argument("--data", required=True, help="text file, folder of text files, or dataset")
    s.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    s.add_argument("--seqlen", type=int, default=2048, help="window length")
    s.add_argument("--stride", type=int, default=None, help="window stride (default: --seqlen)")
    s.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens only")
    s.add_argument("--reference", default=None, help="dense model folder: report fidelity instead of perplexity")
    s.add_argument("--split", default=None, help="dataset split for a dataset --data (default: the spec's, else train)")
    s.add_argument("--download", action="store_true", help="let a dataset --data be downloaded (default: local cache only)")
    _add_device_dtype(s)
    s.set_defaults(fn=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as e:
        if os.environ.get("SEMISPARSE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"semisparse {a.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
