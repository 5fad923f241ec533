"""The OpenAI-compatible server, over real HTTP on 127.0.0.1: schema, streaming, validation, batching of
concurrent streams, disconnects, the official `openai` client, and a bounded fuzz."""
import concurrent.futures
import json
import time

import pytest
from helpers import CHAT_TEXT, micro_chat_model

from nanojax.batcher import Batcher
from nanojax.engine import Engine
from nanojax.tokenizer import Tokenizer

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
serve = pytest.importorskip("nanojax.serve")



@pytest.fixture(scope="module")
def stack():
    tok = Tokenizer.train(CHAT_TEXT, 300)
    model = micro_chat_model(tok.vocab_size, 128)
    batcher = Batcher(model, tok, slots=16, use_tool=False)
    server = serve.ServerThread(serve.create_app(batcher, tok, "micro-chat"))
    keyed = serve.ServerThread(serve.create_app(batcher, tok, "micro-chat", api_key="sesame"))
    yield {"model": model, "tok": tok, "batcher": batcher, "url": server.url, "keyed": keyed.url}
    server.stop()
    keyed.stop()
    batcher.close()


def chat_body(text="the cat", **kw):
    return {"model": "micro-chat", "messages": [{"role": "user", "content": text}], "temperature": 0.0,
            "max_tokens": 16, **kw}


def greedy_reply(stack, text, max_tokens=16):
    tok = stack["tok"]
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": text},
                                                     {"role": "assistant", "content": "x"}]})
    seqs, _ = Engine(stack["model"], tok, use_tool=False).generate_batch(prompt, max_tokens=max_tokens,
                                                                          temperature=0.0)
    return tok.decode(seqs[0][len(prompt):]), len(prompt)


def sse_text(response) -> tuple[str, list]:
    chunks = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    decoded = [json.loads(c) for c in chunks[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in decoded if c["choices"])
    return text, decoded


def test_chat_completion_schema_usage_and_finish(stack):
    r = httpx.post(stack["url"] + "/v1/chat/completions", json=chat_body(), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    expected, prompt_len = greedy_reply(stack, "the cat")
    assert body["object"] == "chat.completion" and body["model"] == "micro-chat" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] == prompt_len
    assert body["usage"]["total_tokens"] == prompt_len + body["usage"]["completion_tokens"]


def test_stream_equals_non_stream_and_reports_usage(stack):
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", timeout=60,
                      json=chat_body(stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text, chunks = sse_text(r)
    assert text == greedy_reply(stack, "the cat")[0]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_sixteen_concurrent_streams_batch_and_each_is_right(stack):
    prompts = [f"{CHAT_TEXT[i % 3][: 10 + i]}" for i in range(16)]
    expected = [greedy_reply(stack, p)[0] for p in prompts]
    steps_before = stack["batcher"].steps

    def one(p):
        with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=chat_body(p, stream=True),
                          timeout=120) as r:
            return sse_text(r)[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts))
    assert got == expected
    # batched: far fewer decode steps than the 16 replies' tokens one after another
    assert stack["batcher"].steps - steps_before < sum(16 for _ in prompts) / 2


def test_disconnect_mid_stream_frees_the_slot(stack):
    body = chat_body(stream=True, temperature=1.0, max_tokens=100)
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # leave after the first text
    deadline = time.time() + 10
    while stack["batcher"].load()["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert stack["batcher"].load()["active"] == 0


def test_openai_client_chat_and_stream(stack):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["micro-chat"]
    expected = greedy_reply(stack, "the cat")[0]
    out = client.chat.completions.create(model="micro-chat", messages=[{"role": "user", "content": "the cat"}],
                                         temperature=0, max_tokens=16)
    assert out.choices[0].message.content == expected
    stream = client.chat.completions.create(model="micro-chat", messages=[{"role": "user", "content": "the cat"}],
                                            temperature=0, max_tokens=16, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    many = client.chat.completions.create(model="micro-chat", messages=[{"role": "user", "content": "the cat"}],
                                          temperature=1.0, n=3, seed=5, max_tokens=8)
    assert [c.index for c in many.choices] == [0, 1, 2]


def test_completions_models_health_page_and_api_key(stack):
    url = stack["url"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "one two", "max_tokens": 5, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    assert r.json()["usage"]["completion_tokens"] <= 5
    assert httpx.get(url + "/health").json()["status"] == "ok"
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "nanojax chat" in page.text and "http" not in page.text.split("<script>")[0]
    assert httpx.get(stack["keyed"] + "/v1/models").status_code == 401
    ok = httpx.get(stack["keyed"] + "/v1/models", headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200
    assert httpx.post(stack["keyed"] + "/v1/chat/completions", json=chat_body()).json()["error"]["code"] == \
        "invalid_api_key"


BAD = [
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    (chat_body(temperature=3), 400, "temperature"),
    (chat_body(temperature="hot"), 400, "temperature"),
    (chat_body(top_p=0), 400, "top_p"),
    (chat_body(n=0), 400, "n"),
    (chat_body(max_tokens=0), 400, "max_tokens"),
    (chat_body(max_tokens=10_000), 400, "max_tokens"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (chat_body(seed=-1), 400, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 9000}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}] * 1000}, 400, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}, 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_each_bad_request_is_named(stack, body, status, param):
    r = httpx.post(stack["url"] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_bounded_fuzz_gets_only_4xx_and_the_server_keeps_serving(stack):
    url = stack["url"] + "/v1/chat/completions"
    raw = [b"{", b"not json", b"[]", b"null", b'{"messages": "hi"}', b"\xff\xfe\xfa",
           b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}',  # invalid UTF-8 inside a string
           json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 1e9}).encode()]
    statuses = [httpx.post(url, content=b, headers={"Content-Type": "application/json"}, timeout=30).status_code
                for b in raw]
    big = httpx.post(url, content=b"x" * (10 << 20), headers={"Content-Type": "application/json"}, timeout=60)
    chunked = httpx.post(url, content=iter([b"x" * (1 << 20)] * 3), headers={"Content-Type": "application/json"},
                         timeout=60)
    assert all(400 <= s < 500 for s in statuses), statuses
    assert big.status_code == 413 and chunked.status_code == 413
    assert httpx.post(url, json=chat_body(), timeout=60).status_code == 200


def chromium_driver():
    """Headless Chromium through Debian's chromedriver (nothing downloaded); None with the reason if absent."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no chromium + chromedriver on this machine (Debian: apt-get install chromium chromium-driver; "
                    "launch/test.sh installs them where it can)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)


def test_the_page_in_a_real_browser(stack):
    """Type, see the streamed reply, stop one, regenerate, start a new chat; a screenshot is kept."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver()
    wait = WebDriverWait(driver, 30)
    try:
        driver.get(stack["url"] + "/")
        wait.until(lambda d: "micro-chat" in d.find_element(By.ID, "model").text)
        driver.execute_script("document.getElementById('temperature').value = 0;")
        box = driver.find_element(By.ID, "input")
        box.send_keys("the cat\n")
        assistant = lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")  # noqa: E731
        wait.until(lambda d: assistant(d) and not d.find_element(By.ID, "send").get_attribute("disabled"))
        reply = assistant(driver)[0].text
        assert reply.startswith(greedy_reply(stack, "the cat", 256)[0][:20].strip() or reply[:1])
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "the cat"
        # stop: the request is aborted while it streams; the page says so and is usable again
        driver.execute_script("document.getElementById('input').value = 'one two three';"
                              "document.getElementById('form').requestSubmit();"
                              "document.getElementById('stop').click();")
        wait.until(lambda d: len(assistant(d)) == 2 and "(stopped)" in assistant(d)[1].text)
        # regenerate replaces the last reply
        wait.until(lambda d: not d.find_element(By.ID, "regenerate").get_attribute("disabled"))
        driver.find_element(By.ID, "regenerate").click()
        wait.until(lambda d: len(assistant(d)) == 2 and "(stopped)" not in assistant(d)[1].text
                   and not d.find_element(By.ID, "send").get_attribute("disabled"))
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.error") == []  # history that no longer fits is trimmed
        import pathlib
        shots = pathlib.Path(__file__).resolve().parents[1] / "test-artifacts"
        shots.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(shots / "serve_page.png"))
        driver.find_element(By.ID, "new").click()
        assert assistant(driver) == []
        # a calculator call and its output are shown apart from the text
        spans = driver.execute_script(
            "const d = document.createElement('div');"
            "render(d, 'Sum: <|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> so 5.');"
            "return [...d.children].map(c => [c.className, c.textContent]);")
        assert spans == [["tool", "calc: 2+3"], ["tool-out", "= 5"]]
    finally:
        driver.quit()


def test_stalled_and_trickling_clients_are_dropped_and_connections_capped(stack, monkeypatch):
    """Connections that send nothing, half a request head or a body that stops are closed after the read
    timeout; past the connection cap new clients get 503 at once, and service resumes when the stalled go."""
    import socket

    monkeypatch.setattr(serve, "READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(serve, "MAX_CONNECTIONS", 12)
    server = serve.ServerThread(serve.create_app(stack["batcher"], stack["tok"], "micro-chat"))
    port = int(server.url.rsplit(":", 1)[1])
    try:
        stalled = []
        for i in range(12):
            s = socket.create_connection(("127.0.0.1", port))
            if i % 3 == 1:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # half a head
            elif i % 3 == 2:  # a whole head, then a body that stops after 10 of its 100 bytes
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"messages\"")
            stalled.append(s)
        time.sleep(0.2)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 503  # at the cap: refused at once
        time.sleep(2.0)
        for s in stalled:
            s.settimeout(2)
            data = s.recv(1000)
            assert data == b"" or data.startswith((b"HTTP/1.1 4", b"HTTP/1.1 503")), data  # closed (4xx/503 first)
            s.close()
        t = time.time()
        assert httpx.post(server.url + "/v1/chat/completions", json=chat_body(), timeout=30).status_code == 200
        assert time.time() - t < 5
    finally:
        server.stop()


def test_without_max_tokens_the_reply_takes_what_the_context_leaves(stack):
    body = chat_body()
    del body["max_tokens"]
    r = httpx.post(stack["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] <= stack["batcher"].seq_len


def test_the_command_serves_a_saved_run_to_curl(stack, tmp_path):
    """`python -m nanojax.serve RUN_DIR --port P` on a run written to disk, asked by curl (or httpx without it)."""
    import json as jsonlib
    import os
    import shutil
    import subprocess
    import sys

    from flax import nnx
    from helpers import ROOT, micro_config

    from nanojax.checkpoint import Checkpointer

    config = micro_config(tmp_path / "run")
    config.model.vocab_size, config.model.seq_len = stack["tok"].vocab_size, 128
    config.data.tokenizer_dir = str(stack["tok"].save(tmp_path / "tokenizer"))
    ckptr = Checkpointer(config.run_dir, async_save=False)
    ckptr.save(1, nnx.state(stack["model"], nnx.Param), None, None,
               {"step": 1, "config": config.to_dict(), "tokenizer_dir": config.data.tokenizer_dir}, force=True)
    ckptr.close()
    port = serve.ServerThread.free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanojax.serve", config.run_dir, "--port", str(port), "--slots",
                             "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            time.sleep(0.3)
        body = jsonlib.dumps(chat_body())
        if shutil.which("curl"):
            out = subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/v1/chat/completions", "-H",
                                  "Content-Type: application/json", "-d", body], capture_output=True, text=True,
                                 timeout=60).stdout
        else:
            out = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=body, timeout=60).text
        reply = jsonlib.loads(out)
        assert reply["model"] == "micro"
        assert reply["choices"][0]["message"]["content"] == greedy_reply(stack, "the cat")[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
