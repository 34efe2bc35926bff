"""The ``subspace-jax`` command line (also ``python -m subspace_jax``).

Subcommands:

* ``demo``: the main job on built-in defaults (baselines on real pretrained MiniLM
  and real text; each method adds its rows as it lands).
* ``bench [NAME ...] --size tiny|small|full [--out DIR]``: the standard benchmark of
  every method (or of the named ones): one table of memory/FLOP/time ratios against each
  method's baseline and one JSON (:mod:`subspace_jax.bench`). ``bench NAME [ARGS...]``
  runs a method's script (``experiments/<script>.py`` of a source checkout) with its own
  ARGS (``bench`` alone lists them; ``bench NAME --help``).
* ``info``: versions, devices, and what the library offers.
* ``select``: print which parameters of a reference model a set of path rules
  selects (built abstractly: no weights are loaded or allocated).
"""

from __future__ import annotations

import argparse
import platform
import sys

__all__ = ["main"]

_MODELS = ("minilm", "vit-digits", "llama-1m", "llama-5m", "llama-20m", "llama-100m")


def _abstract_model(name: str):
    """Build a reference model with ``nnx.eval_shape`` (shapes only)."""
    from flax import nnx

    if name == "minilm":
        from subspace_jax.models import bert

        config = bert.BertConfig.from_json(bert.default_model_dir() / "config.json")
        return bert.abstract_bert(config)
    if name == "vit-digits":
        from subspace_jax.models import vit

        return nnx.eval_shape(lambda: vit.ViT(vit.ViTConfig.digits(), rngs=nnx.Rngs(0)))
    from subspace_jax.models import llama

    config = llama.LlamaConfig.preset(name.split("-", 1)[1], vocab_size=4096)
    return nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0)))


def _select(args: argparse.Namespace) -> int:
    from flax import nnx

    from subspace_jax import rules

    model = _abstract_model(args.model)
    state = nnx.state(model, nnx.Param)
    chosen = [rules.Rule(pattern=p) for p in args.pattern]
    try:
        selection = rules.select(state, chosen)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(selection.table(all_leaves=args.all))
    print(f"\n{len(selection.selected)} of {len(selection.matches)} parameters selected")
    return 0


def _info(args: argparse.Namespace) -> int:
    del args
    import flax
    import jax
    import optax

    import subspace_jax

    print(f"subspace_jax {subspace_jax.__version__}")
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}")
    print(f"devices: {jax.devices()}")
    from subspace_jax import forms, littlebit, lora, nested, wasi

    kinds = (forms.LowRank, lora.LoRA, wasi.WasiKernel, wasi.WasiMasterKernel, nested.Nested,
             littlebit.BinaryLowRank, littlebit.PackedBinaryLowRank)
    print("kernel forms: " + ", ".join(k.__name__ for k in kinds) + " (2-D or N-D, folded)")
    print("methods: wasi, nested, littlebit (transform / convert), lorapre (optax); "
          "layers: nnx Linear/LinearGeneral/Einsum (adopt), linen Dense/DenseGeneral/Einsum "
          "(nn.intercept)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from subspace_jax import demo

    return demo.main(args.extra) or 0


def _bench(args: argparse.Namespace) -> int:
    from subspace_jax import bench

    try:
        return bench.main(args.extra)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subspace-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", add_help=False,
                          help="run the main job on built-in defaults (demo --help: its options)")
    demo.set_defaults(run=_demo)
    bench = sub.add_parser("bench", add_help=False,
                           help="benchmark every method: bench [NAME ...] --size tiny|small|full "
                                "(bench --help)")
    bench.set_defaults(run=_bench)
    info = sub.add_parser("info", help="versions, devices and what the library offers")
    info.set_defaults(run=_info)
    select = sub.add_parser("select", help="show which parameters path rules select")
    select.add_argument("--model", choices=_MODELS, default="minilm")
    select.add_argument(
        "--pattern", action="append", required=True, help="regex on '/'-joined paths (repeatable)"
    )
    select.add_argument("--all", action="store_true", help="also list unselected parameters")
    select.set_defaults(run=_select)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Examples:
        >>> from subspace_jax.__main__ import main
        >>> main(["select", "--model", "llama-1m", "--pattern", r"blocks/0/mlp/(up|down)/kernel"])
        path                      shape       dtype    action
        ------------------------  ----------  -------  ------
        blocks/0/mlp/down/kernel  (384, 128)  float32  select
        blocks/0/mlp/up/kernel    (128, 384)  float32  select
        <BLANKLINE>
        2 of ... parameters selected
        0
    """
    args, extra = _parser().parse_known_args(argv)
    if extra and args.run not in (_demo, _bench):
        _parser().error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
