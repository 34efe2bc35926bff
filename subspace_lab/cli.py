"""The ``subspace-jax`` command line (also ``python -m subspace_lab``).

Subcommands:

* ``demo``: the main job on built-in defaults (baselines on real pretrained MiniLM and real
  text, every method at one shared budget, beside the recorded runs).
* ``bench [NAME ...] --size tiny|small|full [--out DIR]``: the standard benchmark of every
  method (or of the named ones): one table of memory/FLOP/time ratios against each
  method's baseline and one JSON (:mod:`subspace_lab.bench`); ``bench --list``.
* ``run NAME [FLAGS]``: one experiment with its flags (:mod:`subspace_lab.experiments`;
  ``run --list``; ``run NAME --help``).
* ``info``: versions, devices, and what the library offers.
* ``select``: print which parameters of a reference model a set of path rules selects
  (built abstractly: no weights are loaded or allocated).

:func:`validate` parses a whole command line, the experiment's flags included, without
running it (the docs' commands are checked with it).
"""

from __future__ import annotations

import argparse
import platform
import sys

__all__ = ["main", "validate"]

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
    from subspace_lab import demo

    return demo.main(args.extra) or 0


def _bench(args: argparse.Namespace) -> int:
    from subspace_lab import bench

    return bench.main(args.extra)


def _experiment(args: argparse.Namespace):
    """The experiment module ``run NAME`` names (argparse error if there is none)."""
    from subspace_lab import experiments

    try:
        return experiments.load(args.name)
    except ValueError as e:
        _parser().error(str(e))


def _list_experiments() -> int:
    from subspace_lab import experiments

    for name in experiments.names():
        doc = (experiments.load(name).__doc__ or "").strip().splitlines()
        print(f"{name:<20} {doc[0] if doc else ''}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.list or args.name is None:
        return _list_experiments()
    return _experiment(args).main(args.extra) or 0


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
    run = sub.add_parser("run", help="run one experiment: run NAME [FLAGS] (run --list; "
                                     "run NAME --help)")
    run.add_argument("name", nargs="?", help="the experiment (run --list)")
    run.add_argument("--list", action="store_true", help="list the experiments")
    run.set_defaults(run=_run)
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
        >>> from subspace_lab.cli import main
        >>> main(["select", "--model", "llama-1m", "--pattern", r"blocks/0/mlp/(up|down)/kernel"])
        path                      shape       dtype    action
        ------------------------  ----------  -------  ------
        blocks/0/mlp/down/kernel  (384, 128)  float32  select
        blocks/0/mlp/up/kernel    (128, 384)  float32  select
        <BLANKLINE>
        2 of ... parameters selected
        0
    """
    args = _parse(argv)
    return args.run(args)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"] and len(argv) > 1 and not argv[1].startswith("-"):
        # run NAME FLAGS...: every flag after NAME is the experiment's (its own --help)
        args = _parser().parse_args(argv[:2])
        args.extra = argv[2:]
        return args
    args, extra = _parser().parse_known_args(argv)
    if extra and args.run not in (_demo, _bench):
        _parser().error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return args


def validate(argv: list[str]) -> None:
    """Parse a ``subspace-jax`` command line (without the program name) as running it
    would, the demo's, bench's or experiment's own flags included, and run nothing.

    Raises:
        SystemExit: status 2 with argparse's message on stderr, as the command would
            (``--help`` exits with status 0 after printing the help).

    Examples:
        >>> validate(["run", "wasi_finetune", "--quick", "--only", "wasi"])
        >>> validate(["bench", "--size", "tiny", "wasi"])
        >>> validate(["run", "wasi_finetune", "--no-such-flag"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    args = _parse(argv)
    if args.run is _demo:
        from subspace_lab import demo

        demo.parse(args.extra)
    elif args.run is _bench:
        from subspace_lab import bench

        bench.parse(args.extra)
    elif args.run is _run and args.name is not None:
        _experiment(args).parse(args.extra)


if __name__ == "__main__":
    sys.exit(main())
