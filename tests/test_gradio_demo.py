"""gradio_demo.py in a real headless Chromium (Debian's chromium + chromium-driver, installed by
scripts/install_browser.sh): type a question, press Send, see a streamed answer; Clear empties the chat."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import pytest

from conftest import ROOT, free_port, running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
BROWSER_MISSING = not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER))
needs_browser = pytest.mark.skipif(
    BROWSER_MISSING, reason="chromium/chromedriver not installed (run: sudo bash scripts/install_browser.sh)")

QUESTION = "What are the early warning signs of a stroke?"


def chat_in_browser(url: str, screenshot: str, question: str = QUESTION, answer_timeout: float = 180) -> str:
    """Open the demo, ask `question`, wait for the answer; saves a screenshot, checks Clear; returns the answer."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1200,1000", "--lang=en-US"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(url)
        box = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea"))
        box.send_keys(question)
        driver.find_element(By.ID, "send").click()

        def bot_text(d):
            return " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']")).strip()

        WebDriverWait(driver, answer_timeout).until(lambda d: bot_text(d))
        # streamed: wait until the text stops growing (the generation has ended), bounded in time
        last, deadline = None, time.monotonic() + answer_timeout
        while time.monotonic() < deadline:
            text = bot_text(driver)
            if text == last:
                break
            last = text
            time.sleep(1.5)
        user = driver.find_element(By.CSS_SELECTOR, "#chatbot [data-testid='user']").text
        assert question in user
        assert box.get_attribute("value") == ""  # the question moved into the chat
        driver.save_screenshot(screenshot)

        driver.find_element(By.ID, "clear").click()
        WebDriverWait(driver, 30).until(
            lambda d: not d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='user'], #chatbot [data-testid='bot']"))
        return last
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def run_demo_in_browser(model_args: list[str], tmp_path, screenshot: str, max_new_tokens: int = 48,
                        timeout: float = 180) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    args = [*model_args, "--server_port", str(port), "--max_new_tokens", str(max_new_tokens)]
    with running_server("gradio_demo.py", args, url, tmp_path / "demo.log", timeout=timeout) as proc:
        answer = chat_in_browser(url, screenshot)
        assert proc.poll() is None, open(tmp_path / "demo.log").read()[-3000:]
    return answer


@needs_browser
def test_chat_in_browser(tiny_model_dir, tmp_path):
    shot = tmp_path / "gradio_demo.png"
    # temperature 1: the random tiny model's greedy answer is only blank lines
    answer = run_demo_in_browser(["--base_model", tiny_model_dir, "--temperature", "1.0"], tmp_path, str(shot))
    assert answer and "the model ended its answer without any text" not in answer
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@needs_browser
def test_chat_in_browser_default_model(tmp_path):
    """The embedded SmolLM2 answers in the page. MEDGPT_SCREENSHOT=docs/images/gradio_demo.png keeps the picture."""
    shot = os.environ.get("MEDGPT_SCREENSHOT") or str(tmp_path / "gradio_demo.png")
    answer = run_demo_in_browser(["--temperature", "0"], tmp_path, shot, max_new_tokens=160)
    assert len(answer.split()) >= 5


def test_defaults_are_local_and_private():
    sys.path.insert(0, str(ROOT))
    import gradio_demo
    import openai_api

    demo = gradio_demo.parse_args([])
    assert demo.host == "127.0.0.1" and demo.port == 7860 and demo.share is False
    api = openai_api.parse_args([])
    assert api.host == "127.0.0.1" and api.port == 8000
    assert openai_api.parse_args(["--server_name", "0.0.0.0", "--port", "9"]).host == "0.0.0.0"


def test_fit_context_drops_oldest_rounds():
    from medgpt.serving import MessageError
    from medgpt.serving.gradio_app import fit_context

    class Chat:
        context_length = 10

        def build_prompt(self, messages, system_prompt=None):
            return " ".join([system_prompt or ""] + [m["content"] for m in messages])

        def count_tokens(self, text):
            return len(text.split())

    turns = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1 q1"},
             {"role": "assistant", "content": "a1 a1"}, {"role": "user", "content": "q2 q2"},
             {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"}]
    assert fit_context(Chat(), turns, None, 2) == turns[:1] + turns[3:]  # 11 words -> 6
    assert fit_context(Chat(), turns, None, 0) == turns[:1] + turns[1:]  # 9 words fit
    with pytest.raises(MessageError):
        fit_context(Chat(), [{"role": "user", "content": "w " * 20}], None, 2)
