"""The `fastllava` CLI: flags -> request, validation before load, streaming stdout, exit codes."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

from fastllava import cli

URL = "https://example.com/cat.png"


class FakeLLaVA:
    """Stands in for fastllava.api.LLaVA: replays cumulative snapshots, records requests."""

    def __init__(self, outputs, events=None, fail_after=None, error=None):
        self.outputs, self.events = outputs, events
        self.fail_after, self.error = fail_after, error  # raise `error` instead of snapshot i
        self.requests = []

    def stream(self, request):
        self.requests.append(request)
        for i, text in enumerate(self.outputs):
            if self.fail_after is not None and i == self.fail_after:
                raise self.error
            if self.events is not None:
                self.events.append(("yield", text))
            yield {"output": text, "partial": i < len(self.outputs) - 1}


@pytest.fixture
def fake(monkeypatch):
    """Patch the load seam; returns the list of load calls and the fake model."""
    model = FakeLLaVA(["", "Hel", "Hello", "Hello", "Hello, wörld"])
    calls = []

    def load(name, device, dtype, runtime):
        calls.append((name, device, dtype))
        assert runtime.max_num_seqs >= 1
        return model

    monkeypatch.setattr(cli, "_load_model", load)
    return calls, model


def run(*flags, image=URL):
    return cli.main(["run", "--model", "some/model", "--image", image, "--prompt", "hi", *flags])


def test_streams_suffixes_and_ends_with_newline(fake, capsys):
    calls, model = fake
    assert run() == 0
    out, err = capsys.readouterr()
    assert out == "Hello, wörld\n", repr(out)
    assert err == ""
    assert calls == [("some/model", None, None)], calls
    # Flags left out are omitted so the API's schema applies the fal defaults.
    assert model.requests == [{"image_url": URL, "prompt": "hi"}], model.requests


def test_each_suffix_is_written_and_flushed_as_it_arrives():
    events = []

    class Out:
        def write(self, text):
            events.append(("write", text))

        def flush(self):
            events.append(("flush",))

    model = FakeLLaVA(["", "ab", "ab", "abc"], events)
    assert cli.write_stream(model.stream({}), Out()) == "abc"
    assert events == [
        ("yield", ""), ("yield", "ab"), ("write", "ab"), ("flush",), ("yield", "ab"),
        ("yield", "abc"), ("write", "c"), ("flush",), ("write", "\n"), ("flush",)], events


def test_empty_stream_prints_just_a_newline(capsys):
    assert cli.write_stream(iter([{"output": "", "partial": False}]), sys.stdout) == ""
    assert capsys.readouterr().out == "\n"


def test_snapshot_that_rewrites_printed_text_is_a_bug(capsys):
    with pytest.raises(RuntimeError, match="stream contract violated.*'abc'.*'abX'"):
        cli.write_stream(iter([{"output": "abc"}, {"output": "abX"}]), sys.stdout)


def test_all_flags_map_onto_request_and_loader(fake, capsys):
    calls, model = fake
    rc = run("--max-tokens", "5", "--temperature", "0", "--top-p", "0.5", "--seed", "7",
             "--device", "cuda:1", "--dtype", "bf16")
    assert rc == 0, capsys.readouterr().err
    assert calls == [("some/model", "cuda:1", "bfloat16")], calls
    request = model.requests[0]
    assert request == {"image_url": URL, "prompt": "hi", "max_tokens": 5, "temperature": 0.0,
                       "top_p": 0.5, "seed": 7}, request
    assert type(request["max_tokens"]) is int and type(request["seed"]) is int


@pytest.mark.parametrize("spelling,canonical", [
    ("float32", "float32"), ("fp32", "float32"), ("FP16", "float16"), ("float16", "float16"),
    ("bf16", "bfloat16"), ("bfloat16", "bfloat16")])
def test_dtype_spellings(fake, capsys, spelling, canonical):
    calls, _ = fake
    assert run("--dtype", spelling) == 0
    assert calls[0][2] == canonical, calls


@pytest.mark.parametrize("flags,field", [
    (["--max-tokens", "0"], "max_tokens"),
    (["--max-tokens", "100000"], "max_tokens"),
    (["--temperature", "2.5"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--seed", "-1"], "seed"),
])
def test_validation_fails_before_loading(fake, capsys, flags, field):
    calls, _ = fake
    assert run(*flags) == 2
    out, err = capsys.readouterr()
    assert calls == [], "the model was loaded before the request was validated"
    assert out == ""
    assert err.startswith(f"error: {field}: ") and err.count("\n") == 1, repr(err)


def test_blank_prompt_fails_before_loading(fake, capsys):
    calls, _ = fake
    assert cli.main(["run", "--model", "m", "--image", URL, "--prompt", "   "]) == 2
    assert calls == []
    assert capsys.readouterr().err.startswith("error: prompt: ")


def test_missing_local_image_fails_before_loading(fake, capsys, tmp_path):
    calls, _ = fake
    missing = tmp_path / "nope.png"
    assert run(image=str(missing)) == 2
    err = capsys.readouterr().err
    assert calls == [] and err.startswith("error: image: no such file") and str(missing) in err, err
    assert run(image=str(tmp_path)) == 2
    assert "is a directory" in capsys.readouterr().err
    picture = tmp_path / "cat.png"
    picture.write_bytes(b"not checked here: the API decodes it")
    assert run(image=str(picture)) == 0 and calls == [("some/model", None, None)]
    assert run(image="data:image/png;base64,AAAA") == 0


@pytest.mark.parametrize("error,code", [
    (ValueError("checkpoint not found: 'some/model'\n(looked in ./some/model)"), 2),
    (FileNotFoundError(2, "No such file or directory", "/x/config.json"), 1),
    (PermissionError(13, "Permission denied", "/x/model.safetensors"), 1),
])
def test_load_errors_are_one_line_without_traceback(monkeypatch, capsys, error, code):
    def load(*args):
        raise error

    monkeypatch.setattr(cli, "_load_model", load)
    assert run() == code
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, repr(err)
    assert "Traceback" not in err


def test_error_mid_stream_keeps_printed_text(monkeypatch, capsys):
    model = FakeLLaVA(["a", "ab", "abc"], fail_after=2,
                      error=ValueError("image: cannot decode 'x.png' as an image"))
    monkeypatch.setattr(cli, "_load_model", lambda *a: model)
    assert run() == 2
    out, err = capsys.readouterr()
    assert out == "ab" and err == "error: image: cannot decode 'x.png' as an image\n", (out, err)


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    model = FakeLLaVA(["a", "ab"], fail_after=1, error=KeyboardInterrupt())
    monkeypatch.setattr(cli, "_load_model", lambda *a: model)
    assert run() == 130
    out, err = capsys.readouterr()
    assert (out, err) == ("a", ""), (out, err)


def test_usage_errors_and_help(fake, capsys):
    calls, _ = fake
    assert cli.main(["--help"]) == 0
    assert "run" in capsys.readouterr().out
    assert cli.main(["run", "--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in ("--model", "--image", "--prompt", "--max-tokens", "--temperature", "--top-p",
                 "--seed", "--device", "--dtype", "(default 64)", "(default 0.2)"):
        assert flag in help_text, (flag, help_text)
    assert cli.main([]) == 2
    assert cli.main(["run", "--model", "m", "--image", URL]) == 2  # no --prompt
    assert "--prompt" in capsys.readouterr().err
    assert run("--dtype", "fp8") == 2
    assert "invalid dtype 'fp8'; accepted: float32, fp32" in capsys.readouterr().err
    assert run("--max-tokens", "1.5") == 2  # argparse: not an int
    assert calls == []


def test_python_dash_m_and_script_entry_point():
    done = subprocess.run([sys.executable, "-m", "fastllava", "run", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: fastllava run"), done
    script = shutil.which("fastllava")
    if script is not None:  # installed console script (pip install -e .)
        done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("fastllava "), done


def test_bad_flag_fails_without_importing_torch():
    code = ("import sys; from fastllava.cli import main; "
            "rc = main(['run', '--model', 'm', '--image', 'x.png', '--prompt', 'hi', "
            "'--max-tokens', '0']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    expected = "error: max_tokens: must be an integer between 1 and 4096, got 0\n"
    assert done.stderr == expected, done.stderr


def test_closed_stdout_pipe_exits_quietly():
    """`fastllava run ... | head -c 5`: no BrokenPipeError traceback, exit 1."""
    code = (
        "import sys\n"
        "from fastllava import cli\n"
        "class Endless:\n"
        "    def stream(self, request):\n"
        "        for i in range(1, 10**6):\n"
        "            yield {'output': 'x' * i, 'partial': True}\n"
        "cli._load_model = lambda *a: Endless()\n"
        "sys.exit(cli.main(['run', '--model', 'm', '--image', 'https://a', '--prompt', 'hi']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.read(5) == b"xxxxx"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1, err
    assert err == "", err


@pytest.mark.skipif(importlib.util.find_spec("fastllava.api") is None,
                    reason="fastllava.api (LLaVA) not written yet")
def test_real_cli_matches_api_generate(tiny_llava, tmp_path):
    import numpy as np
    from PIL import Image

    from fastllava.api import LLaVA

    image = tmp_path / "img.png"
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    request = {"image_url": str(image), "prompt": "hi", "max_tokens": 5, "temperature": 0}
    done = subprocess.run(
        [sys.executable, "-m", "fastllava", "run", "--model", str(tiny_llava),
         "--image", str(image), "--prompt", "hi", "--max-tokens", "5", "--temperature", "0",
         "--device", "cpu",
         "--dtype", "fp32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    llava = LLaVA.from_pretrained(str(tiny_llava), device="cpu", dtype="float32")
    expected = llava.generate(request)
    assert expected["partial"] is False, expected
    assert done.stdout == expected["output"] + "\n", (done.stdout, expected)


def test_runtime_flags_map_onto_runtime_config():
    import dataclasses

    from fastllava.runtime.config import RuntimeConfig

    args = cli.build_parser().parse_args(
        ["serve", "--model", "m", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
         "--no-prefix-caching", "--kv-cache-tokens", "4096", "--gpu-memory-fraction", "0.5",
         "--queue-concurrency", "3"])
    settings = cli.settings_from_args(args)
    assert settings.runtime == RuntimeConfig(max_num_seqs=8, max_num_batched_tokens=512,
                                             prefix_caching=False, kv_cache_tokens=4096,
                                             gpu_memory_fraction=0.5)
    assert settings.queue_concurrency == 3
    defaults = cli.settings_from_args(cli.build_parser().parse_args(["serve", "--model", "m"]))
    assert defaults.runtime == RuntimeConfig()
    run_args = cli.build_parser().parse_args(["run", "--model", "m", "--image", "x", "--prompt",
                                              "p", "--max-context", "1024", "--no-cuda-graphs"])
    assert cli.runtime_from_args(run_args) == dataclasses.replace(
        RuntimeConfig(), max_context=1024, cuda_graphs=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        cli.settings_from_args(cli.build_parser().parse_args(
            ["serve", "--model", "m", "--max-num-seqs", "64", "--max-num-batched-tokens", "8"]))
