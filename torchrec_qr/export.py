"""``python -m torchrec_qr.export --run runs/<name> [--dtype int8|int4|fp16|fp32] --out DIR``.

Turns a training run's latest checkpoint (saved at any world size) into a serving artifact: the run's
DLRM with every embedding table quantized into FBGEMM int-N kernels, TorchScript when the model scripts,
the quantized state dict, a probe batch and ``manifest.json`` (tables, storage, dtype, bytes, source run
and config). See ``torchrec_qr.inference.artifact`` for the layout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from torchrec_qr.inference.modules import DTYPES
from torchrec_qr.inference.quant_storage import DEFAULT_ROW_ALIGNMENT
from torchrec_qr.inference.serving import export_run
from torchrec_qr.train.memory import format_bytes

EXIT_ERROR = 2


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m torchrec_qr.export",
        description="Turn a training run's checkpoint into a quantized serving artifact.",
    )
    parser.add_argument("--run", required=True, help="run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--dtype", default="int8", help=f"embedding weight dtype: {' | '.join(DTYPES)} (default int8)")
    parser.add_argument("--out", required=True, help="export directory to create (must not exist)")
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the run's latest)")
    parser.add_argument(
        "--row-alignment",
        type=int,
        default=DEFAULT_ROW_ALIGNMENT,
        help="pad rows to this many bytes (default 16, as TorchRec; 1 is smallest on CPU)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        out = export_run(args.run, args.out, args.dtype, args.checkpoint, args.row_alignment)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"Exported {manifest['checkpoint']} (step {manifest['step']}) to {out} as {manifest['dtype']}")
    for t in manifest["tables"]:
        parts = ", ".join(f"{p['name']} {p['rows']}x{p['dim']} {p['dtype']}" for p in t["storage"])
        print(
            f"  {t['name']:<10} {t['rows']:>10,} x {t['dim']:<4} {t['stored_as']:<36} "
            f"{format_bytes(t['bytes']):>10}  [{parts}]"
        )
    ratio = manifest["fp32_full_bytes"] / max(manifest["total_bytes"], 1)
    print(
        f"  tables: {format_bytes(manifest['total_bytes'])} (fp32 full tables "
        f"{format_bytes(manifest['fp32_full_bytes'])}, {ratio:.1f}x smaller)"
    )
    print(
        "  TorchScript: model.pt"
        if manifest["torchscript"]
        else f"  TorchScript: not written ({manifest['torchscript_error']}); predict rebuilds from weights.pt"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
