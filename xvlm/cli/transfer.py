"""``xvlm transfer``: zero-shot transfer between datasets — every trained run tested on every run's data.

``xvlm transfer --configs a.yaml b.yaml ... --ckpt_paths a.ckpt b.ckpt ... --out transfer.md [--metric test/RR]``

Run ``i`` is the module of ``configs[i]`` with the weights of ``ckpt_paths[i]``; dataset ``j`` is the datamodule of
``configs[j]``. Cell ``(i, j)`` is ``metric`` of ``xvlm test`` of run ``i`` on dataset ``j``: the datamodule's own
categories and rationales are attached to the module (its task-dependent text is rebuilt; its trained weights do
not depend on the vocabulary) and nothing is retrained. The diagonal is the in-dataset number. The matrix is
written to ``--out`` as a Markdown table (rows: trained on, columns: tested on) and printed.
Any other argument (``--trainer.accelerator cpu``) goes to every run's CLI parser, as in ``xvlm test``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xvlm transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True, help="The runs' configs (their data: the datasets).")
    parser.add_argument("--ckpt_paths", nargs="+", required=True, help="One checkpoint per config, in order.")
    parser.add_argument("--out", required=True, help="Markdown file of the matrix.")
    parser.add_argument("--metric", default="test/RR", help="Logged test metric of each cell (default test/RR).")
    return parser


def run_name(config: str) -> str:
    """The ``run`` of a config file, else its stem."""
    return str(yaml.safe_load(Path(config).read_text()).get("run") or Path(config).stem)


def transfer_matrix(configs: Sequence[str], ckpt_paths: Sequence[str], metric: str,
                    build_cli: Callable[..., LightningCLI], overrides: Sequence[str] = ()) -> list[list[float]]:
    """``metric`` of run ``i`` tested on the data of ``configs[j]``, ``[len(configs)][len(configs)]``."""
    matrix = []
    for config, checkpoint in zip(configs, ckpt_paths):
        row = []
        for data_config in configs:
            data = yaml.safe_load(Path(data_config).read_text())["data"]
            cli = build_cli(args=["--config", config, "--data", yaml.safe_dump(data), *overrides])
            (metrics,) = cli.trainer.test(cli.model, cli.datamodule, ckpt_path=checkpoint, verbose=False)
            if metric not in metrics:
                raise ValueError(f"xvlm transfer: {config} logs no {metric} on the data of {data_config}; it logs "
                                 f"{', '.join(sorted(metrics))}")
            row.append(float(metrics[metric]))
        matrix.append(row)
    return matrix


def markdown_matrix(names: Sequence[str], matrix: Sequence[Sequence[float]], metric: str) -> str:
    """Rows: trained on; columns: tested on."""
    lines = [f"| {metric}: trained on ↓ / tested on → | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    lines += [f"| {name} | " + " | ".join(f"{value:.3f}" for value in row) + " |" for name, row in zip(names, matrix)]
    return "\n".join(lines) + "\n"


def transfer_command(argv: Sequence[str], build_cli: Callable[..., LightningCLI]) -> None:
    """Run ``xvlm transfer`` (module docstring); input errors exit with a message naming the bad input."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if len(args.configs) != len(args.ckpt_paths):
        parser.error(f"{len(args.configs)} configs but {len(args.ckpt_paths)} checkpoints: give one per config")
    for path in [*args.configs, *args.ckpt_paths]:
        if not Path(path).is_file():
            parser.error(f"file '{path}' does not exist")
    try:
        matrix = transfer_matrix(args.configs, args.ckpt_paths, args.metric, build_cli, overrides)
    except ValueError as error:
        parser.error(str(error))
    table = markdown_matrix([run_name(c) for c in args.configs], matrix, args.metric)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table, end="")
