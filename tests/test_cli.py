"""The one-shot command line: answers on stdout, readable errors with exit code 2."""

import subprocess
import sys

from PIL import Image

from instructblip_core.cli import main


def test_cli_answers_each_question(tiny_checkpoints, tmp_path, capsys):
    folder = tiny_checkpoints("instructblip-llama")
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), "red").save(image)
    code = main(["--model", str(folder), "--image", str(image), "--max-new-tokens", "6", "what colour?", "how many?"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(lines)


def test_cli_bad_image_is_a_readable_error(tiny_checkpoints, tmp_path):
    folder = tiny_checkpoints("instructblip-llama")
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    result = subprocess.run(
        [sys.executable, "-m", "instructblip_core.cli", "--model", str(folder), "--image", str(not_image), "what?"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "notes.txt is not an image file" in result.stderr
    assert "Traceback" not in result.stderr


def test_interactive_chat_over_stdin(tiny_checkpoints, tmp_path):
    folder = tiny_checkpoints("instructblip-llama")
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (40, 40), "red").save(red)
    Image.new("RGB", (40, 40), "blue").save(blue)
    script = "\n".join(["what colour is it?", "is it big?", ":undo", ":retry", f":image {blue}", "and now?",
                        ":image nowhere.png", "", ":quit", "never read"]) + "\n"
    result = subprocess.run(
        [sys.executable, "-m", "instructblip_core.cli", "--model", str(folder), "--image", str(red), "--max-new-tokens", "5"],
        input=script, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("Ask about the image")
    assert "(forgot: is it big?)" in out
    assert "(new image)" in out
    assert any("New image" in line for line in out)
    assert any(line.startswith("error: nowhere.png does not exist") for line in out)
    answers = [line for line in out if not line.startswith(("(", "Ask", "error"))]
    assert len(answers) == 4  # two questions, one retry, one about the new image
