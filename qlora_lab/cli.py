"""The `qlora-lab` console script. Each subcommand is registered by an add_<name>_command function
in the module of its idea; this file only wires them together."""
import argparse
import sys

from .doctor import add_doctor_command
from .finetune import add_finetune_command
from .memory import add_memory_command

COMMANDS = (add_memory_command, add_finetune_command, add_doctor_command,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-lab", description="QLoRA rebuilt from the ground up.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileExistsError) as err:
        print(f"qlora-lab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
