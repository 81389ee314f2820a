"""The CLI on the embedded model, at lengths short enough for CI."""

import pytest

from selfextend.cli import main


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.mark.slow
def test_info(capsys):
    assert main(["info", "--target-length", "16384", "--target-length", "32768"]) == 0
    out = capsys.readouterr().out
    assert "trained length L:  8192" in out
    assert "target   16384: group_size=4   window=1024  (reach 29696)" in out
    assert "target   32768: group_size=" in out


@pytest.mark.slow
def test_demo_short_both_answer(capsys):
    assert main(["demo", "--length", "2000", "--depth", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.count("RIGHT") == 2, out  # inside the trained length both read the key
    assert "expected" in out and "prefill time SelfExtend / vanilla" in out


@pytest.mark.slow
def test_ask_streams_and_reports(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret word is pineapple. " + "Filler sentence about nothing. " * 60)
    assert main(["ask", "--file", str(doc), "What is the secret word?", "-G", "4", "-W", "64",
                 "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "prompt tokens, prefill" in captured.err and "tokens/s" in captured.err
    # what was streamed is the model's greedy answer under the same settings, not just some text
    import selfextend
    from selfextend.generation import greedy_answer

    model, tokenizer = selfextend.load_model()
    selfextend.apply(model, group_size=4, window=64)
    messages = [{"role": "user", "content": f"{doc.read_text()}\n\nWhat is the secret word?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = greedy_answer(model, tokenizer, prompt, max_new_tokens=12, progress=False).text
    assert expected.strip() and captured.out == expected + "\n"


def test_ask_bad_settings_is_a_clear_error(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("short")
    assert main(["ask", "--file", str(doc), "q", "-G", "0", "-W", "64"]) == 2
    assert "-G/--group-size: 0 is below 1" in capsys.readouterr().err
