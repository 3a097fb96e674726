"""``torchrun ... -m torchrec_qr.train --config configs/<name>.yaml [--resume] [key=value ...]``.

The config is loaded and checked before any process group starts; rank 0 prints the summary at the end.
Runs without torchrun too (one process, world size 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.distributed.rendezvous import rendezvous

from torchrec_qr.distributed.checkpoint import CheckpointWriteError
from torchrec_qr.train.config import ConfigError, config_to_dict, load_config, validate
from torchrec_qr.train.memory import format_bytes
from torchrec_qr.train.run_dir import RunLock, check_run_dir, is_restart
from torchrec_qr.train.sharding import check_plan_file
from torchrec_qr.train.trainer import DistEnv, TrainingDiverged, train

EXIT_CONFIG_ERROR = 2


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m torchrec_qr.train",
        description="Train DLRM with full, hashed or compositional embedding tables on torchrun.",
        epilog="Overrides are dotted keys, e.g. embeddings.kind=hash train.max_steps=100 data.global_batch_size=4096",
    )
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument(
        "--allow-config-change",
        action="append",
        default=[],
        metavar="KEY[,KEY...]",
        help="with --resume: accept these changed settings (e.g. run.seed,optimizer.sparse.lr)",
    )
    parser.add_argument("--check", action="store_true", help="validate the config, print it resolved, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    args.allow_config_change = [k.strip() for item in args.allow_config_change for k in item.split(",") if k.strip()]
    return args


def _use_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _init_distributed(device_kind: str) -> DistEnv:
    use_cuda = _use_cuda(device_kind)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:
        # torchrun's agent keeps one TCPStore across restarts: keys of a previous attempt (e.g. gloo's peer
        # addresses) are still there, and a restarted group may connect to dead peers. Use fresh keys.
        store, rank, world_size = next(rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend, store=dist.PrefixStore(f"torchrec_qr/attempt_{attempt}", store), rank=rank, world_size=world_size
        )
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=device,
    )


def _setup_logging(rank: int) -> None:
    """Our progress on rank 0 at INFO; third-party chatter (fbgemm logs every kernel's arguments) only on error."""
    logging.basicConfig(
        level=logging.ERROR,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # imported libraries may have configured the root logger already
    )
    logging.getLogger("torchrec_qr").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("torch").setLevel(logging.ERROR)  # has its own handler; warns on every fx trace
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable end-of-run report."""
    lines = [
        f"Run {s['run_dir']}: {s['steps']} steps on {s['world_size']} rank(s)"
        + (f", resumed from {s['resumed_from']}" if s["resumed_from"] else ""),
        f"  training: {s['steps_this_run']} steps in {s['train_seconds']:.1f} s, {s['samples_per_s']:,.0f} samples/s "
        f"(global batch {s['global_batch_size']}, {s['local_batch_size']} per rank)",
    ]
    for split, m in s["metrics"].items():
        lines.append(
            f"  {split:<5} log loss {m['log_loss']:.5f}  NE {m['ne']:.5f}  AUC {m['auc']:.5f}  "
            f"accuracy {m['accuracy']:.5f}  ({m['samples']:,} samples)"
        )
    if s["reference"]:
        r = s["reference"]
        lines.append(
            f"  synthetic data: Bayes-optimal log loss {r['bayes_log_loss']:.5f}, constant predictor "
            f"{r['constant_log_loss']:.5f} (on the generated evaluation day)"
        )
    mem = s["memory"]
    lines.append(
        f"  embedding tables: {format_bytes(mem['param_bytes'])} parameters + {format_bytes(mem['optimizer_bytes'])} "
        f"optimizer state; full tables: {format_bytes(mem['full_param_bytes'])} + "
        f"{format_bytes(mem['full_optimizer_bytes'])} ({mem['compression']:.1f}x compression)"
    )
    lines.append(
        f"    {'table':<8} {'rows':>10} {'stored as':<28} {'sub-table rows':<22} {'sharding':<14} "
        f"{'params':>10} {'opt state':>10} {'full':>10} {'ratio':>7}"
    )
    for t in s["tables"]:
        lines.append(
            f"    {t['table'][2:]:<8} {t['logical_rows']:>10,} {t['stored_as'][:28]:<28} "
            f"{str(t['sub_table_rows'])[:22]:<22} {t['sharding_type']:<14} {format_bytes(t['param_bytes']):>10} "
            f"{format_bytes(t['optimizer_bytes']):>10} {format_bytes(t['full_param_bytes']):>10} "
            f"{t['compression']:>6.1f}x"
        )
    if s["malformed_lines_skipped"]:
        lines.append(f"  malformed input lines skipped: {s['malformed_lines_skipped']:,}")
    lines.append(f"  checkpoint: {s['checkpoint']}")
    lines.append("  outputs: " + ", ".join(f"{k} {v}" for k, v in s["outputs"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    lock: RunLock | None = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume:
            cfg.checkpoint.resume = True
        if args.allow_config_change and not cfg.checkpoint.resume:
            raise ConfigError("--allow-config-change: only meaningful with --resume")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world_size, torch.cuda.is_available())
        device_type = "cuda" if _use_cuda(cfg.run.device) else "cpu"
        check_plan_file(cfg, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), device_type)
        if not args.check and os.environ.get("RANK", "0") == "0":  # one job per run directory, checked under it
            lock = RunLock(cfg, wait_s=60.0 if is_restart() else 0.0)
        check_run_dir(cfg, args.allow_config_change)
    except (ConfigError, OSError) as e:
        if lock is not None:
            lock.release()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.check:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    _setup_logging(int(os.environ.get("RANK", "0")))
    env = _init_distributed(cfg.run.device)
    try:
        summary = train(cfg, env)
    except (ValueError, OSError, TrainingDiverged, CheckpointWriteError) as e:  # data, checkpoints, divergence
        print(f"[rank{env.rank}] error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        dist.destroy_process_group()
        if lock is not None:
            lock.release()
    if env.rank == 0:
        print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
