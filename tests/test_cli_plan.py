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
