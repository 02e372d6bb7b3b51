import json
import subprocess
import sys

import pytest

from ultragen.cli import main


def test_plan_json_has_the_documented_keys(capsys):
    assert main(["plan", "--width", "8192", "--height", "8192", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("hires_grid", "padded_hires_grid", "guide_grid", "seq_len", "text_len", "block_density",
                "attention_flop_reduction"):
        assert key in out
    assert out["hires_grid"] == [512, 512] and out["guide_grid"] == [128, 128]
    assert out["seq_len"] == 512 + 512 * 512 + 128 * 128
    assert out["attention_flop_reduction"] >= 50


def test_plan_pads_uhd(capsys):
    assert main(["plan", "--width", "3840", "--height", "2160", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hires_grid"] == [135, 240] and out["padded_hires_grid"] == [144, 240]
    assert out["guide_image_grid"] == [36, 60] and out["guide_grid"] == [36, 64]


def test_plan_text_output(capsys):
    assert main(["plan", "--width", "4096", "--height", "4096"]) == 0
    text = capsys.readouterr().out
    assert "4096x4096 px = 256x256 tokens" in text and "fewer" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "1000", "--height", "1024"], "not a multiple of 16"),
        (["--width", "65536", "--height", "1024"], "above the limit"),
        (["--width", "1024", "--height", "1024", "--rho", "3"], "divides window_tokens"),
        (["--width", "1024", "--height", "1024", "--window", "12"], "does not tile"),
        (["--width", "1024", "--height", "1024", "--policy", "nope"], "unknown attention policy"),
        (["--width", "32768", "--height", "32768", "--policy", "dense"], "GiB of block tables"),
    ],
)
def test_plan_bad_input_exits_2_with_one_line(capsys, args, message):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_console_script_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "ultragen", "plan", "--width", "0", "--height", "16"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "must be positive" in result.stderr


# --- the command line as a new user meets it -----------------------------------------------------------------------
def test_help_imports_no_torch_and_plan_no_diffusers_or_peft():
    code = (
        "import sys\n"
        "from ultragen.cli import build_parser, main\n"
        "build_parser().format_help()\n"
        "assert not {'torch', 'diffusers', 'peft'} & set(sys.modules), sorted({'torch', 'diffusers', 'peft'} & set(sys.modules))\n"
        "assert main(['plan', '--width', '1024', '--height', '1024']) == 0\n"
        "assert not {'diffusers', 'peft', 'transformers'} & set(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("argv, words", [
    (["generate", "--model", "tiny-random", "--prompt", "x", "--width", "512", "--height", "512", "--seed", "abc"],
     "argument --seed: expected a whole number, got 'abc'; see `ultragen generate --help`"),
    (["plan", "--width", "512"], "ultragen plan: error: the following arguments are required: --height"),
    (["train", "prepare", "--model", "tiny-random", "--out", "x", "--bogus"],
     "ultragen train prepare: error: unrecognized arguments: --bogus; see `ultragen train prepare --help`"),
])
def test_malformed_command_line_is_one_line_not_the_usage(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_ctrl_c_prints_one_line_and_exits_130(capsys, monkeypatch):
    import ultragen.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ultragen.cli, "run_plan", interrupted)
    assert main(["plan", "--width", "1024", "--height", "1024"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "ultragen plan: interrupted; no file was left half-written"


def _all_options(parser) -> set[str]:
    import argparse

    parser.populate()
    options = set()
    for action in parser._actions:
        options.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= _all_options(sub)
    return options


def test_every_option_named_in_a_message_exists():
    """Advice must be typable: each --option written in the CLI's and configs' source (errors, help, logs) is one."""
    import re
    from pathlib import Path

    from ultragen.cli import build_parser

    root = Path(__file__).resolve().parents[1] / "src" / "ultragen"
    files = ["cli.py", "checks.py", "layout.py", "pipeline/config.py", "pipeline/job.py", "pipeline/loading.py",
             "pipeline/outputs.py", "pipeline/decode.py", "train/config.py", "train/commands.py", "train/prepare.py"]
    named = {m for f in files for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", (root / f).read_text())}
    # other programs' options, in the commands that launch ultragen on several processes: `accelerate launch
    # --num_processes 8 -m ultragen.cli train`, `torchrun --nproc-per-node N -m ultragen.cli generate`
    named -= {"--num_processes", "--nproc-per-node"}
    assert named, "no options found: the scan is broken"
    assert named - _all_options(build_parser()) == set()
