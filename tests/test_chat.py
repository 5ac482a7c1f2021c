"""`firebolt-vl chat`: streamed answers equal `generate`, multi-turn history, /image and its errors, piped stdin."""

import io
import subprocess
import sys

import pytest
from PIL import Image

from firebolt_vl.serve.chat import ChatSession, run_chat
from firebolt_vl.serve.engine import IncrementalText


def greedy_answer(model, processor, messages, image, max_new_tokens):
    enc = processor(processor.chat_prompt(messages), images=image)
    out = model.generate(**enc, max_new_tokens=max_new_tokens)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = model.config.text_config.eos_token_id
    return processor.decode(new[: new.index(eos)] if eos in new else new)


@pytest.fixture
def blue_path(tmp_path):
    path = tmp_path / "blue.png"
    Image.new("RGB", (30, 20), (0, 0, 255)).save(path)
    return path


@pytest.mark.parametrize("compile_mode", [None, "static"])  # "static": chat --compile's decoding, uncompiled
def test_piped_session_streams_generate_answers(tiny_factory, red_image, blue_path, compile_mode):
    model, processor = tiny_factory()
    session = ChatSession(model, processor, red_image, max_new_tokens=8, compile=compile_mode)
    stdin = io.StringIO(f"What color is the circle?\nhow many?\n/image {blue_path}\nwhat now?\n"
                        "/image /no/such/file.png\n/bogus\n/quit\nnever read\n")
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(session, stdin, out, err, interactive=False) == 0
    transcript = out.getvalue()
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    a1 = greedy_answer(model, processor, first, red_image, 8)
    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "how many?"}]
    a2 = greedy_answer(model, processor, second, red_image, 8)  # the history is part of the prompt
    blue = Image.open(blue_path).convert("RGB")
    third = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what now?"}]}]
    a3 = greedy_answer(model, processor, third, blue, 8)  # a new image starts a new conversation
    position = 0
    for answer in (a1, a2, a3):
        position = transcript.index(f"assistant> {answer}\n", position) + 1
    assert transcript.count("assistant> ") == 3
    lines = transcript.splitlines()
    assert f"(image: {blue_path}; new conversation)" in lines
    assert "image file not found" in err.getvalue()  # a bad /image is reported, the chat goes on
    assert any(line.startswith("unknown command /bogus") for line in lines)
    assert len(session.turns) == 1


def test_text_only_reset_and_trimming(tiny_factory):
    model, processor = tiny_factory()
    session = ChatSession(model, processor, None, max_new_tokens=4, max_prompt_tokens=60)
    sink = io.StringIO()
    for _ in range(6):  # each turn adds ~15 tokens: the oldest turns must be dropped to stay under 60
        session.reply("how many shapes are there", sink)
    assert len(session.turns) == 6
    assert session.inputs("and now?")["input_ids"].shape[1] <= 60
    with pytest.raises(ValueError, match="over the limit"):
        session.reply("what color is the shape " * 20, sink)
    session.reset()
    assert session.turns == []


def test_sampled_session_is_reproducible(tiny_factory, red_image):
    model, processor = tiny_factory()
    answers = []
    for _ in range(2):
        session = ChatSession(model, processor, red_image, max_new_tokens=6, temperature=0.9, seed=5)
        answers.append([session.reply("what color", io.StringIO()), session.reply("and now", io.StringIO())])
    assert answers[0] == answers[1]


def test_incremental_text_holds_partial_characters_and_stops(tiny_factory):
    _, processor = tiny_factory()
    tok = processor.tokenizer
    ids = tok("the red circle é ünïcode is there", add_special_tokens=False)["input_ids"]
    text = IncrementalText(tok)
    pieces = [text.add(i) for i in ids] + [text.flush()]
    assert "".join(pieces) == tok.decode(ids) and all("\ufffd" not in p for p in pieces)
    stopper = IncrementalText(tok, stop=["circle"])
    shown = "".join(stopper.add(i) for i in ids) + stopper.flush()
    assert shown == "the red " and stopper.stopped


def test_chat_command_with_piped_input(tiny_factory, red_image, tmp_path, blue_path):
    from firebolt_vl.hub import save_model_dir

    model, processor = tiny_factory()
    save_model_dir(model, processor, tmp_path / "model")
    red_image.save(tmp_path / "red.png")
    r = subprocess.run(
        [sys.executable, "-m", "firebolt_vl.cli", "chat", "--model", str(tmp_path / "model"), "--image",
         str(tmp_path / "red.png"), "--max-new-tokens", "5"],
        input=f"hello\n/image {blue_path}\nwhat color?\n/quit\n", capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2
    assert f"(image: {blue_path}; new conversation)" in r.stdout


def test_chat_command_errors(tmp_path, capsys):
    from firebolt_vl.cli import main

    assert main(["chat", "--model", str(tmp_path), "--image", str(tmp_path / "nope.png")]) == 2
    assert "image file not found" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path / "no_model")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path / "no_model"), "--compile", "fast"]) == 2
    assert "compile mode" in capsys.readouterr().err
