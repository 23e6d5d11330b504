"""The `hmoe` command line, run as a user runs it: in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def hmoe(*args, stdin=None, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_generate_json(tiny_v3):
    r = hmoe("generate", "--model", tiny_v3, "-p", "Hello there", "-n", "7", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_token_ids"][0] == 0 and len(out["generated_token_ids"]) == 7
    assert out["finish_reason"] == "length" and isinstance(out["text"], str)
    assert set(out["timings"]) == {"prefill_s", "decode_s", "prefill_tokens_per_s", "decode_tokens_per_s"}


def test_generate_streams_text_and_reports_speed(tiny_v3):
    r = hmoe("generate", "--model", tiny_v3, "-p", "Hello", "-n", "5", "--temp", "0.7", "--seed", "1")
    assert r.returncode == 0 and r.stdout.strip()
    assert "generated 5 tok" in r.stderr and "t/s" in r.stderr


def test_chat_scripted(tiny_v3):
    r = hmoe("chat", "--model", tiny_v3, "-n", "6", "--seed", "0", stdin="Hello\nHow are you?\n/reset\nHi\n/exit\n")
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.stderr.splitlines() if line.startswith("[prompt")]
    assert len(stats) == 3 and all("t/s" in s for s in stats)
    assert "[conversation cleared]" in r.stderr
    assert r.stdout.count("> ") >= 4


def test_chat_without_model_uses_the_demo(tmp_path):
    r = hmoe("chat", "-n", "4", stdin="Hi\n", env_extra={"HMOE_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "random" in r.stderr and "noise" in r.stderr
    assert (tmp_path / "demo-tiny-v3-v1" / "config.json").exists()


def test_perplexity(tiny_v3, tmp_path):
    from runtime.demo_text import CORPUS

    text = tmp_path / "text.txt"
    text.write_text(CORPUS * 3)
    r = hmoe("perplexity", "--model", tiny_v3, "-f", text, "--ctx", "128")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[1]") and "[2]" in r.stdout
    final = r.stdout.strip().splitlines()[-1]
    assert final.startswith("Final estimate: PPL = ") and " +/- " in final
    r = hmoe("perplexity", "--model", tiny_v3, "-f", text, "--ctx", "128", "--json", "--chunks", "2")
    assert json.loads(r.stdout)["chunks"] == 2


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/nonexistent", "-p", "x"], "/nonexistent: no such file"),
    (["generate", "--model", "{model}", "-p", "x", "--top-p", "2"], "top-p must be in (0, 1]"),
    (["perplexity", "--model", "{model}", "-f", "/nonexistent.txt"], "/nonexistent.txt: no such file"),
    (["make-model", "--preset", "tiny-v3", "--out", "{model}"], "exists and is not empty"),
])
def test_bad_input_is_one_line_without_traceback(tiny_v3, args, message):
    r = hmoe(*[a.replace("{model}", str(tiny_v3)) for a in args])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"hmoe: error: {r.stderr.split('error: ', 1)[1].strip()}"]
    assert message in r.stderr and "Traceback" not in r.stderr


def test_every_command_has_help():
    for command in ["chat", "generate", "perplexity", "make-model"]:
        r = hmoe(command, "--help")
        assert r.returncode == 0 and "usage: hmoe " + command in r.stdout


def test_ctrl_c_stops_a_reply_but_not_the_chat(tiny_v3):
    import signal

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "chat", "--model", str(tiny_v3), "-n", "100000",
                             "--ctx", "400", "--temp", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # a test run started in the background inherits an ignored SIGINT: restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdin.write("Hello\n")
    proc.stdin.flush()
    seen = ""
    while not (seen.startswith("> ") and len(seen) > 10):  # the reply has started streaming
        seen += proc.stdout.read(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("Hi again\n/exit\n", timeout=120)
    assert proc.returncode == 0, err
    stats = [line for line in err.splitlines() if line.startswith("[prompt")]
    assert stats[0].endswith("| interrupted]") and len(stats) == 2
