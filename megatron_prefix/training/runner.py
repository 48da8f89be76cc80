"""The training runner behind ``launch/train_dpo.py`` and ``launch/train_rm.py`` (one loop for both).

Order of a run: parse the recipe and overrides -> validate the config against the world size and device
(before any model is built) -> init process groups (CPU compat on CPU) -> open the dataset, fix the
vocabulary -> build policy (DDP, optimizer, schedule) -> resume from ``<checkpoint.dir>/latest`` or
start from ``checkpoint.load`` -> reference log-probs (precompute / online) -> steps through megatron's
``get_forward_backward_func`` -> checkpoints, evaluation, metrics. SIGTERM / SIGUSR1 (SLURM preemption)
save and exit cleanly; a NaN/inf loss or grad norm stops the run naming the step and keeps the last good
checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_prefix.config import collect_errors, dump_yaml
from megatron_prefix.data.dataset import PreferenceDataset
from megatron_prefix.faults import fault_point
from megatron_prefix.parallel import init_parallel, seed_everything
from megatron_prefix.progress import Progress
from megatron_prefix.training import flops
from megatron_prefix.training.checkpoint import CheckpointError, CheckpointManager, load_sharded, resolve
from megatron_prefix.training.cli import _PrintedConfig, parse_config  # noqa: F401 - re-exported
from megatron_prefix.training.config import TrainConfig
from megatron_prefix.training.console import tee_console
from megatron_prefix.training.exit_codes import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR
from megatron_prefix.training.failure import describe, fail, user_message
from megatron_prefix.training.loader import StepLoader, eval_rows
from megatron_prefix.training.metrics import MetricsLogger, console_line
from megatron_prefix.training.reference import (
    ReferenceCache, checkpoint_fingerprint, key_digest, precompute, reference_key,
)
from megatron_prefix.training.resume import check_freeze, start_points
from megatron_prefix.training.setup import build_stage, build_trainable, check_loaded_keys, load_state, sharded_state
from megatron_prefix.training.signals import PreemptedExit, _agree, _Preempted
from megatron_prefix.training.vocab import resolve_model_config
from megatron_prefix.training.step import (
    StepContext, attach_plans, logprob_collector, loss_func, make_microbatches, reduce_report, response_positions,
    run_schedule,
)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _log(msg: str) -> None:
    if _is_rank0():
        print(msg, flush=True)


class Run:
    """One training run; ``main`` drives it."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.cuda = torch.cuda.is_available() and cfg.resolved_device(torch.cuda.is_available()) == "cuda"
        world = int(os.environ.get("WORLD_SIZE", "1"))
        with collect_errors():
            cfg.validate(world_size=world, cuda=torch.cuda.is_available())
        p = cfg.parallel
        self.info = init_parallel(tp=p.tp, pp=p.pp, cp=p.cp, seed=cfg.train.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.dataset = PreferenceDataset(cfg.data.path, cfg.data.layout)
        _Preempted.install()  # from here on a preemption notice is honoured (precompute included)
        if _is_rank0():
            tee_console(cfg.checkpoint.dir)
        self.ckpt = CheckpointManager(cfg.checkpoint, log=_log)
        self.resume_path, self.load_path = start_points(self.ckpt, cfg.checkpoint.load, _log)
        self._fix_vocab()
        fault_point("setup", 0)  # test hook: an error on one rank only (MEGATRON_PREFIX_FAULT_RANK)
        self._record_run()
        self.train_ids, self.eval_ids = self.dataset.split_ids(cfg.data.eval_fraction, cfg.data.seed)
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.loader = StepLoader(self.dataset, self.train_ids, cfg.data.batch_config(), dp_rank, dp_size)
        self.ctx = StepContext(
            task=cfg.task, loss=cfg.loss, device=self.device, cp_size=p.cp,
            cp_rank=ps.get_context_parallel_rank(), needs_reference=cfg.reference.mode != "none",
        )
        seed = partial(seed_everything, cfg.train.seed)
        self.t = build_trainable(cfg, self.model_cfg, self.cuda, seed)
        self.start_step = self._resume_or_load()
        self.ref_model = None
        self.ref_cache = None
        if cfg.reference.mode == "online":
            self.ref_model, _ = build_stage(cfg, self.model_cfg, self.cuda, seed)
            self._load_reference_weights()
        elif cfg.reference.mode == "precompute":
            self._precompute_reference()
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.log_rank = last and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 \
            and ps.get_context_parallel_rank() == 0
        self.metrics = MetricsLogger(cfg.checkpoint.dir, cfg.logging, enabled=self.log_rank,
                                     resume_step=self.start_step)
        if self.log_rank and not _is_rank0():
            tee_console(cfg.checkpoint.dir)  # the training lines come from the last stage

    def _record_run(self) -> None:
        """Rank 0: tee the console into ``<checkpoint.dir>/console.log`` (appended across restarts) and
        write the resolved config (vocabulary fixed) to ``<checkpoint.dir>/config.yaml``."""
        if not _is_rank0():
            return
        run_dir = Path(self.cfg.checkpoint.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(dump_yaml(self.cfg))
        os.replace(tmp, run_dir / "config.yaml")

    # ---------------------------------------------------------------- setup helpers

    def _fix_vocab(self) -> None:
        """The model config this run builds: vocabulary and architecture checked against the dataset and
        the checkpoint it resumes or loads (``training.vocab.resolve_model_config``)."""
        self.model_cfg = resolve_model_config(self.cfg, self.dataset, self.resume_path, self.ckpt.latest(), _log)
        self.cfg.model = self.model_cfg  # train_state.json's config records the architecture actually built

    def _from_hf(self) -> bool:
        return bool(getattr(self.cfg, "model_source", None))

    def train_state(self, step: int) -> dict:
        return {
            "step": step,
            "has_optimizer": True,
            "scheduler": self.t.scheduler.state_dict(),
            "model": asdict(self.model_cfg),
            "task": self.cfg.task,
            "tokenizer": self.dataset.tokenizer_info,  # compared with the dataset's on resume / load
            "config": asdict(self.cfg),
            "world": {"tp": self.info.tp_size, "pp": self.info.pp_size, "cp": self.info.cp_size,
                      "dp": self.info.dp_size},
        }

    def _resume_or_load(self) -> int:
        if self.resume_path is not None:
            return self._load(self.resume_path, with_optimizer=True, resume=True)
        if self.load_path is not None:
            path = self.load_path
            has_opt = CheckpointManager.read_train_state(path).get("has_optimizer", False)
            self._load(path, with_optimizer=has_opt and self.cfg.checkpoint.load_optimizer, resume=False)
        return 0

    def _load(self, path: Path, with_optimizer: bool, resume: bool) -> int:
        state_info = CheckpointManager.read_train_state(path)
        # a reward model started from a language model's checkpoint keeps its fresh scalar head
        without_head = self.cfg.task == "rm" and state_info.get("task", "dpo") != "rm" and not resume
        if without_head and with_optimizer:
            raise ValueError("checkpoint.load_optimizer: set it false to start a reward model from an LM checkpoint")
        if with_optimizer:  # Adam's state exists only for what the checkpoint trained (model.freeze_*)
            where = f"checkpoint {path} ({'checkpoint.dir, resumed' if resume else 'checkpoint.load'})"
            check_freeze(state_info.get("model"), self.model_cfg, where, path)
        same_world = state_info.get("world") == {"tp": self.info.tp_size, "pp": self.info.pp_size,
                                                 "cp": self.info.cp_size, "dp": self.info.dp_size}
        state, info = CheckpointManager.load(
            path, lambda: sharded_state(self.t, with_optimizer, is_loading=True, without_head=without_head),
            restore_rng=resume and same_world,
        )
        load_state(self.t, state, without_head=without_head)
        if resume:
            self.t.scheduler.load_state_dict(info["scheduler"])
            _log(f"resumed from {path} at step {info['step']}")
            return int(info["step"])
        _log(f"loaded weights from {path}")
        return 0

    def _load_reference_weights(self) -> None:
        """Online reference = the initial policy: the `checkpoint.load` weights or the same seeded init."""
        if self.cfg.checkpoint.load:
            from megatron.core.utils import unwrap_model

            core = unwrap_model(self.ref_model)
            path = resolve(self.cfg.checkpoint.load)
            state = load_sharded({"model": core.sharded_state_dict()}, path)
            check_loaded_keys(*core.load_state_dict(state["model"], strict=False))
        for p in self.ref_model.parameters():
            p.requires_grad_(False)
        self.ref_model.eval()

    def _reference_key(self) -> dict:
        load = self.cfg.checkpoint.load
        ref = {"checkpoint": str(resolve(load)) if load else None, "init_seed": None if load else self.cfg.train.seed}
        if load:
            path = resolve(load)
            ref["checkpoint_step"] = CheckpointManager.read_train_state(path).get("step")
            ref["checkpoint_files"] = checkpoint_fingerprint(path)
        return reference_key(self.dataset, asdict(self.model_cfg), ref, self.cfg.resolved_dtype(self.cuda))

    def _precompute_reference(self) -> None:
        key = self._reference_key()
        # default: one cache per (dataset, reference) under the dataset; an explicit path is checked
        root = self.cfg.reference.path or str(Path(self.cfg.data.path) / "reference" / key_digest(key)[:16])
        self.ref_cache = ReferenceCache(root, self.dataset, key)
        if self.ref_cache.is_complete():
            self.ref_cache.check_key()
            return
        if self.start_step > 0:
            raise ValueError(
                f"reference.path: {root} is incomplete but this run resumes at step {self.start_step}; the "
                "reference is the initial policy, which is gone: restart without a checkpoint or set reference.mode"
            )
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        writer = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_context_parallel_rank() == 0
        finished = precompute(
            self.ref_cache,
            lambda ids: eval_rows(self.dataset, ids, self.cfg.data.pack_tokens, dp_rank, dp_size),
            partial(self._forward_values, [self.t.model]),
            writer,
            _log,
            stop=lambda: _agree(_Preempted.flag, self.device),
        )
        if not finished:
            raise PreemptedExit()

    # ---------------------------------------------------------------- steps

    def _forward_values(self, model: list, rows: list) -> list:
        """Forward-only pass returning (micro-batch, per-response values) on the last stage."""
        mbs = make_microbatches(rows, self.ctx)
        store: list[torch.Tensor] = []
        was_training = [m.training for m in model]
        for m in model:
            m.eval()
        with torch.no_grad():
            run_schedule(model, mbs, partial(logprob_collector, self.ctx, store), self._seq_len(), forward_only=True)
        for m, flag in zip(model, was_training):
            m.train(flag)
        return list(zip(mbs, store)) if store else []

    def _seq_len(self) -> int:
        # the full row: megatron's get_tensor_shapes divides by cp (and by tp with sequence parallelism)
        return self.cfg.data.pack_tokens

    def _attach_reference(self, mbs: list) -> None:
        if self.ref_cache is not None:
            for mb in mbs:
                mb.ref_logps = self.ref_cache.lookup(mb, response_positions(mb)).to(self.device)
        elif self.ref_model is not None:
            store: list[torch.Tensor] = []
            with torch.no_grad():
                run_schedule([self.ref_model], mbs, partial(logprob_collector, self.ctx, store),
                             self._seq_len(), forward_only=True)
            for mb, values in zip(mbs, store):
                mb.ref_logps = values.to(self.device)

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        rows = self.loader.rows(step)
        mbs = make_microbatches(rows, self.ctx)
        self._attach_reference(mbs)
        attach_plans(self.ctx, [self.t.model], mbs, self._seq_len())
        self.t.model.zero_grad_buffer()
        self.t.optimizer.zero_grad()
        reports = run_schedule([self.t.model], mbs, partial(loss_func, self.ctx), self._seq_len(), forward_only=False)
        _, grad_norm, _ = self.t.optimizer.step()
        self.t.scheduler.step(increment=1)
        rec = reduce_report(reports, self.device)
        elapsed = time.perf_counter() - t0
        tokens = _allsum(sum(r.num_tokens for r in rows), self.device) / (self.info.tp_size * self.info.cp_size
                                                                          * self.info.pp_size)
        rec.update(
            step=step + 1, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=self.t.optimizer.param_groups[0]["lr"], step_time_s=elapsed,
            pairs_per_s=rec["pairs"] / elapsed, tokens_per_s=tokens / elapsed, tokens=tokens,
            microbatches=len(mbs),
        )
        rec.update(flops.step_report(self.model_cfg, rows, self.info, elapsed, self.device, self.cuda))
        if getattr(self.model_cfg, "vision", None) is not None:  # images encoded this step (all DP ranks)
            rec["images"] = _allsum(sum(flops.row_images(r) for r in rows), self.device) / (
                self.info.tp_size * self.info.cp_size * self.info.pp_size)
        return rec

    def evaluate(self, step: int) -> dict | None:
        if len(self.eval_ids) == 0:
            return None
        ids = self.eval_ids[: self.cfg.data.eval_units]
        rows = eval_rows(self.dataset, ids, self.cfg.data.pack_tokens, ps.get_data_parallel_rank(),
                         ps.get_data_parallel_world_size())
        mbs = make_microbatches(rows, self.ctx)
        self._attach_reference(mbs)
        self.t.model.eval()
        attach_plans(self.ctx, [self.t.model], mbs, self._seq_len())
        bar = Progress(len(ids), f"eval step {step}", unit="units", enabled=_is_rank0(), log=_log)
        reports: list = []
        chunk = max(1, len(mbs) // 8)  # a few schedule calls, so the bar moves (equal counts on every rank)
        with torch.no_grad():
            for start in range(0, len(mbs), chunk):
                reports += run_schedule([self.t.model], mbs[start : start + chunk], partial(loss_func, self.ctx),
                                        self._seq_len(), forward_only=True)
                bar.update(round(len(ids) * min(start + chunk, len(mbs)) / len(mbs)) - bar.done)
        bar.close()
        self.t.model.train()
        rec = reduce_report(reports, self.device)
        rec.update(step=step, split="eval")
        return rec

    def save(self, step: int) -> None:
        path = self.ckpt.save(step, sharded_state(self.t, True, is_loading=False), self.train_state(step))
        _log(f"saved checkpoint {path}")

    def run(self) -> int:
        cfg = self.cfg
        step = self.start_step
        if step >= cfg.train.max_steps:
            _log(f"nothing to do: {self.resume_path} is at step {step}, train.max_steps is {cfg.train.max_steps}")
            self.metrics.close()
            return EXIT_OK
        _log(f"training {cfg.task} ({cfg.loss.type}, layout {cfg.data.layout}) from step {step} to "
             f"{cfg.train.max_steps}; {self.loader.steps_per_epoch} steps per epoch; world {self.info}")
        t_start, first = time.perf_counter(), step
        while step < cfg.train.max_steps:
            rec = self.train_step(step)
            step += 1
            elapsed = time.perf_counter() - t_start
            rec.update(elapsed_s=elapsed, eta_s=(cfg.train.max_steps - step) * elapsed / (step - first))
            if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])):
                last = self.ckpt.latest()
                _log(f"error: non-finite loss {rec['loss']} or grad norm {rec['grad_norm']} at step {step}; "
                     f"stopping. Last good checkpoint: {last or 'none'}")
                self.metrics.log(rec)
                return EXIT_NONFINITE
            self.metrics.log(rec)
            if self.log_rank and (step % cfg.logging.interval == 0 or step == cfg.train.max_steps):
                print(console_line(rec, cfg.train.max_steps), flush=True)
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
                self._eval_and_log(step)
            preempted = _agree(_Preempted.flag, self.device)
            exiting = bool(cfg.train.exit_interval and step % cfg.train.exit_interval == 0 and step < cfg.train.max_steps)
            if preempted or exiting or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
                self.save(step)
            if preempted or exiting:
                _log(f"{'preempted' if preempted else 'train.exit_interval'}: saved at step {step}, exiting")
                self.metrics.close()
                return EXIT_PREEMPTED if preempted else EXIT_OK
        if cfg.train.eval_interval == 0 or step % cfg.train.eval_interval:
            self._eval_and_log(step)
        if cfg.checkpoint.save_at_end and (not cfg.checkpoint.interval or step % cfg.checkpoint.interval):
            self.save(step)
        self.metrics.close()
        return 0

    def _eval_and_log(self, step: int) -> None:
        rec = self.evaluate(step)
        if rec is not None:
            self.metrics.log(rec)
            if self.log_rank:
                print(f"eval  step {step}: loss {rec['loss']:.4f} | accuracy {rec.get('accuracy', float('nan')):.3f}"
                      f" | margin {rec.get('margin', float('nan')):.3f} | pairs {rec['pairs']:.0f}", flush=True)


def _allsum(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def main(argv: list[str], task: str) -> int:
    """Entry point (``training.cli.main``: the config is parsed before megatron is imported)."""
    from megatron_prefix.training.cli import main as cli_main

    return cli_main(argv, task)


def run_config(cfg: TrainConfig, task: str) -> int:
    """Train with a parsed config; returns the process exit code.

    Errors are printed once for the whole job and end every rank (``training.failure``): a user's mistake
    (config, data, checkpoint: ``ValueError`` / ``CheckpointError``) as its message, exit 2; anything else
    with its traceback (a bug), exit 1."""
    try:
        run = Run(cfg)
        code = run.run()
    except PreemptedExit:
        if dist.is_initialized():
            dist.barrier()
        return EXIT_PREEMPTED
    except CheckpointError as err:
        return fail(f"train_{task}: checkpoint error: {err}", EXIT_USER_ERROR, user_error=True)
    except ValueError as err:
        return fail(user_message(task, err), EXIT_USER_ERROR, user_error=True)
    except Exception as err:  # noqa: BLE001 (a bug: its traceback, once, and every rank ends)
        return fail(f"train_{task}: internal error (please report):\n{describe(err)}", 1, user_error=False)
    if dist.is_initialized():
        dist.barrier()
    run.ckpt.close()  # release checkpoint.dir/.lock (also done at exit)
    return code
