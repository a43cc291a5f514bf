"""The `fastllava` CLI (fastllava.cli, fastllava.cli_run): flags -> request, checks before the
load, streaming stdout, exit codes."""

from __future__ import annotations

import http.server
import importlib.util
import io
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fastllava import cli, cli_run

URL = "https://example.com/cat.png"


class FakeLLaVA:
    """Stands in for fastllava.api.LLaVA: replays cumulative snapshots, records requests."""

    def __init__(self, outputs, events=None, fail_after=None, error=None):
        self.outputs, self.events = outputs, events
        self.fail_after, self.error = fail_after, error  # raise `error` instead of snapshot i
        self.requests, self.images = [], []

    def stream(self, request, image=None):
        self.requests.append(request)
        self.images.append(image)
        for i, text in enumerate(self.outputs):
            if self.fail_after is not None and i == self.fail_after:
                raise self.error
            if self.events is not None:
                self.events.append(("yield", text))
            yield {"output": text, "partial": i < len(self.outputs) - 1}


FETCHED = object()   # what the fake image fetch returns


@pytest.fixture
def fake(monkeypatch):
    """Patch the image-fetch and load seams; returns the list of load calls and the fake model."""
    model = FakeLLaVA(["", "Hel", "Hello", "Hello", "Hello, wörld"])
    calls = []

    def load(name, device, dtype, runtime, backend, quantization=None):
        calls.append((name, device, dtype) + ((quantization,) if quantization else ()))
        assert runtime.max_num_seqs >= 1 and backend in cli_run.BACKENDS
        return model

    monkeypatch.setattr(cli_run, "_load_model", load)
    monkeypatch.setattr(cli_run, "_fetch_image", lambda src: FETCHED)
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
    assert model.images == [FETCHED], "the image fetched before loading was not the one used"


def test_each_suffix_is_written_and_flushed_as_it_arrives():
    events = []

    class Out:
        def write(self, text):
            events.append(("write", text))

        def flush(self):
            events.append(("flush",))

    model = FakeLLaVA(["", "ab", "ab", "abc"], events)
    assert cli_run.write_stream(model.stream({}), Out()) == "abc"
    assert events == [
        ("yield", ""), ("yield", "ab"), ("write", "ab"), ("flush",), ("yield", "ab"),
        ("yield", "abc"), ("write", "c"), ("flush",), ("write", "\n"), ("flush",)], events


def test_empty_stream_prints_just_a_newline(capsys):
    assert cli_run.write_stream(iter([{"output": "", "partial": False}]), sys.stdout) == ""
    assert capsys.readouterr().out == "\n"


def test_snapshot_that_rewrites_printed_text_is_a_bug(capsys):
    with pytest.raises(RuntimeError, match="stream contract violated.*'abc'.*'abX'"):
        cli_run.write_stream(iter([{"output": "abc"}, {"output": "abX"}]), sys.stdout)


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
    ("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("AUTO", "auto")])
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


def _png(size=(6, 4)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_host():
    """A loopback HTTP server: /cat.png is a 6x4 PNG, /text.png plain text, anything else 404."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/cat.png": _png(), "/text.png": b"not an image"}.get(self.path)
            self.send_response(404 if body is None else 200)
            body = b"not found" if body is None else body
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def loads(monkeypatch):
    """Only the load seam patched (the image is really fetched): the list of load calls."""
    calls, model = [], FakeLLaVA(["ok"])
    monkeypatch.setattr(cli_run, "_load_model", lambda *args: calls.append(args) or model)
    return calls, model


@pytest.mark.parametrize("image,problem", [
    ("{tmp}/nope.png", "image file '{tmp}/nope.png' does not exist"),
    ("{tmp}", "image path '{tmp}' is not a regular file"),
    ("{tmp}/text.png", "'{tmp}/text.png' is not an image in a supported format"),
    ("data:image/png;base64,AAAA", "is not an image in a supported format"),
    ("{host}/missing.png", "HTTP 404 Not Found fetching image '{host}/missing.png'"),
    ("{host}/text.png", "'{host}/text.png' is not an image in a supported format"),
])
def test_image_is_fetched_and_decoded_before_loading(loads, capsys, tmp_path, image_host, image,
                                                     problem):
    calls, _ = loads
    (tmp_path / "text.png").write_text("not an image")
    fill = {"tmp": str(tmp_path), "host": image_host}
    assert run(image=image.format(**fill)) == 2
    out, err = capsys.readouterr()
    assert calls == [], "the model was loaded before the image was fetched and decoded"
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, repr(err)
    assert problem.format(**fill) in err, err


@pytest.mark.parametrize("where", ["file", "url"])
def test_fetched_image_is_the_one_generated_from(loads, capsys, tmp_path, image_host, where):
    calls, model = loads
    (tmp_path / "cat.png").write_bytes(_png())
    image = str(tmp_path / "cat.png") if where == "file" else image_host + "/cat.png"
    assert run(image=image) == 0, capsys.readouterr().err
    assert len(calls) == 1 and model.images[0].size == (6, 4), model.images
    assert model.requests == [{"image_url": image, "prompt": "hi"}]


def test_unreachable_image_fails_before_torch_is_imported(image_host, tmp_path):
    """The real CLI in a subprocess with a 404 image URL and a model folder that does not exist:
    the error is the image's, and torch (needed to load any weights) was never imported."""
    code = ("import sys; from fastllava.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run(
        [sys.executable, "-c", code, "run", "--model", str(tmp_path / "no-such-model"),
         "--image", image_host + "/gone.png", "--prompt", "hi"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"error: HTTP 404 Not Found fetching image "
                           f"'{image_host}/gone.png'\n"), done.stderr


@pytest.mark.parametrize("error,code", [
    (ValueError("checkpoint not found: 'some/model'\n(looked in ./some/model)"), 2),
    (FileNotFoundError(2, "No such file or directory", "/x/config.json"), 1),
    (PermissionError(13, "Permission denied", "/x/model.safetensors"), 1),
])
def test_load_errors_are_one_line_without_traceback(monkeypatch, capsys, error, code):
    def load(*args):
        raise error

    monkeypatch.setattr(cli_run, "_load_model", load)
    monkeypatch.setattr(cli_run, "_fetch_image", lambda src: FETCHED)
    assert run() == code
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, repr(err)
    assert "Traceback" not in err


def test_error_mid_stream_keeps_printed_text(monkeypatch, capsys):
    model = FakeLLaVA(["a", "ab", "abc"], fail_after=2,
                      error=ValueError("image: cannot decode 'x.png' as an image"))
    monkeypatch.setattr(cli_run, "_load_model", lambda *a: model)
    monkeypatch.setattr(cli_run, "_fetch_image", lambda src: FETCHED)
    assert run() == 2
    out, err = capsys.readouterr()
    assert out == "ab" and err == "error: image: cannot decode 'x.png' as an image\n", (out, err)


class Terminal(io.StringIO):
    """A captured stream that claims to be a terminal (or not)."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _interrupt(*args):
    raise KeyboardInterrupt


@pytest.mark.parametrize("phase,stdout_tty,stderr_tty,want_out,want_err", [
    # Mid-answer: the partial answer's line ends; a terminal on stderr only gets its "^C" line
    # ended too.
    ("stream", False, False, "a\n", ""),
    ("stream", True, True, "a\n", ""),
    ("stream", False, True, "a\n", "\n"),
    # Before any answer text (image fetch, weight load, first token): only a terminal's "^C"
    # line needs ending; a redirected stdout gets nothing.
    ("first-token", True, True, "\n", ""),
    ("first-token", False, False, "", ""),
    ("load", True, False, "\n", ""),
    ("load", False, True, "", "\n"),
    ("load", False, False, "", ""),
    ("fetch", True, True, "\n", ""),
    ("fetch", False, True, "", "\n"),
])
def test_ctrl_c_ends_the_line_and_exits_130(monkeypatch, phase, stdout_tty, stderr_tty,
                                            want_out, want_err):
    model = FakeLLaVA(["a", "ab"], fail_after=0 if phase == "first-token" else 1,
                      error=KeyboardInterrupt())
    monkeypatch.setattr(cli_run, "_fetch_image", _interrupt if phase == "fetch" else lambda s: None)
    monkeypatch.setattr(cli_run, "_load_model", _interrupt if phase == "load" else lambda *a: model)
    out, err = Terminal(stdout_tty), Terminal(stderr_tty)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert run() == 130
    assert (out.getvalue(), err.getvalue()) == (want_out, want_err)


def _endless_answer(delay_s: float) -> subprocess.Popen:
    """The real CLI in a subprocess whose model streams "x", "xx", ... forever (one snapshot per
    delay_s), stdout and stderr piped. SIGINT gets Python's default handler, as under a terminal:
    a runner started as a background job passes SIGINT down ignored, and Python keeps it so."""
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from fastllava import cli, cli_run\n"
        "class Endless:\n"
        "    def stream(self, request, image=None):\n"
        "        for i in range(1, 10**6):\n"
        f"            time.sleep({delay_s})\n"
        "            yield {'output': 'x' * i, 'partial': True}\n"
        "cli_run._load_model = lambda *a: Endless()\n"
        "cli_run._fetch_image = lambda src: None\n"
        "sys.exit(cli.main(['run', '--model', 'm', '--image', 'https://a', '--prompt', 'hi']))\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_sigint_mid_answer_exits_130_with_a_newline_and_no_traceback():
    """A real SIGINT to a real process streaming an endless answer."""
    proc = _endless_answer(delay_s=0.01)
    assert proc.stdout.read(3) == b"xxx"
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    out = b"xxx" + rest
    assert proc.returncode == 130, err
    assert err == b"" and out.endswith(b"x\n") and set(out[:-1]) == {ord("x")}, (out[-20:], err)


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
    # the console script of this interpreter's install (pip install -e .): the one beside
    # sys.executable, else on PATH (another environment's script may run another install)
    beside = Path(sys.executable).with_name("fastllava")
    script = str(beside) if beside.exists() else shutil.which("fastllava")
    if script is not None:
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
    proc = _endless_answer(delay_s=0)
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
         "--device", "cpu", "--dtype", "fp32", "--backend", "torch"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    llava = LLaVA.from_pretrained(str(tiny_llava), device="cpu", dtype="float32")
    expected = llava.generate(request)
    assert expected["partial"] is False, expected
    assert done.stdout == expected["output"] + "\n", (done.stdout, expected)


def test_real_cli_refuses_a_prompt_plus_max_tokens_over_max_context(tiny_llava, tmp_path):
    """The tiny prompt (image included) is under 64 tokens; + 40 is over --max-context 64: one
    error line naming the three numbers, nothing generated (today's answer was cut silently)."""
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 24), (10, 200, 30)).save(image)
    done = subprocess.run(
        [sys.executable, "-m", "fastllava", "run", "--model", str(tiny_llava), "--image",
         str(image), "--prompt", "hi", "--max-tokens", "40", "--max-context", "64",
         "--device", "cpu", "--dtype", "fp32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout)
    last = done.stderr.splitlines()[-1]   # after the weights' progress bar
    assert "Traceback" not in done.stderr and re.fullmatch(
        r"error: max_tokens: prompt tokens \((\d+), image included\) \+ max_tokens \(40\) = "
        r"\d+ exceeds max_context \(64\): lower max_tokens to at most \d+", last), done.stderr


def test_max_tokens_that_leaves_no_room_fails_before_loading(fake, capsys):
    calls, _ = fake
    assert run("--max-tokens", "64", "--max-context", "64") == 2
    err = capsys.readouterr().err
    assert calls == [] and err == ("error: max_tokens: max_tokens (64) leaves no room for the "
                                   "prompt within max_context (64)\n"), err


def test_backend_flag(monkeypatch, capsys):
    from fastllava.kernels.ops import BACKENDS

    assert cli_run.BACKENDS == BACKENDS
    backends = []
    monkeypatch.setattr(cli_run, "_load_model",
                        lambda *a: backends.append(a[4]) or FakeLLaVA(["x"]))
    monkeypatch.setattr(cli_run, "_fetch_image", lambda src: FETCHED)
    for backend in BACKENDS:
        assert run("--backend", backend) == 0
    assert run() == 0
    assert backends == [*BACKENDS, "auto"], backends
    assert run("--backend", "cuda") == 2
    assert "invalid choice: 'cuda'" in capsys.readouterr().err and len(backends) == len(BACKENDS) + 1


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
