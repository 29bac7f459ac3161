"""Images in prompts through llama.cpp's mtmd (issue 17), on a tiny random-weight pair:
tests/tiny_model.py's llama text model and tests/tiny_mmproj.py's LLaVA MLP projector (16
image tokens of the text model's width), with the vendored tools/mtmd/test-1.jpeg as the real
image file.

What is checked: the projector loads (and a mismatched one is refused); the image token count
is what mtmd reports; images change the logits (different images differ, the same image twice
is identical); greedy output is deterministic; a batch of image chats equals the same chats one
at a time; the encode cache is hit for a repeated image (within a prompt and across requests)
and the prompt cache reuses an image prefix; n > 1 and preemption; and every bad input gives a
clear exception -- the crash-prone ones in a subprocess.
"""

from __future__ import annotations

import base64
import struct
import textwrap
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from pyllama import LLM, _core
from pyllama.errors import ContextLengthError, MediaError, ModelLoadError

pytestmark = pytest.mark.skipif(not _core.mtmd_available(), reason="built with -DPYLLAMA_MTMD=OFF")

ROOT = Path(__file__).resolve().parents[1]
JPEG = ROOT / "vendor" / "llama.cpp" / "tools" / "mtmd" / "test-1.jpeg"


def png_bytes(width: int, height: int, rgb=(200, 10, 10), *, declared=None) -> bytes:
    """A minimal PNG (8-bit RGB, filter 0); `declared` overrides the header's size only."""
    w, h = declared or (width, height)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tiny_mmproj import make_tiny_mmproj
    from tiny_model import make_tiny_llama

    d = tmp_path_factory.mktemp("mtmd")
    return make_tiny_llama(d / "text.gguf"), make_tiny_mmproj(d / "mmproj.gguf")


@pytest.fixture(scope="module")
def llm(pair):
    text, proj = pair
    with LLM(str(text), mmproj_path=str(proj), n_ctx=1024, n_parallel=4, kv_unified=False, n_threads=1,
             chat_template="chatml", temperature=0.0, max_tokens=8) as model:
        yield model


def image_chat(url_or_bytes, question="What is in this image?"):
    part = ({"type": "image_url", "image_url": {"url": url_or_bytes}} if isinstance(url_or_bytes, str)
            else {"type": "image", "image": url_or_bytes})
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


# ---- loading ----------------------------------------------------------------------------


def test_projector_loads_and_describes_itself(pair):
    text, proj = pair
    m = _core.Model(str(text))
    mm = _core.Multimodal(m, str(proj))
    assert mm.support_vision and not mm.support_audio
    assert mm.n_embd == m.n_embd
    assert mm.model is m
    assert "vision" in repr(mm)
    mm.close()
    mm.close()   # idempotent
    with pytest.raises(ValueError, match="closed"):
        mm.support_vision


def test_llm_takes_llama_cpp_python_spelling(pair):
    text, proj = pair
    with LLM(str(text), clip_model_path=str(proj), n_ctx=256) as a:
        assert a.multimodal is not None and a.multimodal.path == str(proj)
    with pytest.raises(ValueError, match="once"):
        LLM(str(text), clip_model_path=str(proj), mmproj_path=str(text), n_ctx=256)


def test_mismatched_projector_is_refused(pair, tmp_path):
    from tiny_mmproj import make_mismatched_mmproj

    text, _ = pair
    bad = make_mismatched_mmproj(tmp_path / "wide.gguf")
    with pytest.raises(ModelLoadError, match="n_embd"):
        LLM(str(text), mmproj_path=str(bad), n_ctx=256)
    with pytest.raises(FileNotFoundError):
        LLM(str(text), mmproj_path=str(tmp_path / "missing.gguf"), n_ctx=256)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        (tmp_path / "junk.gguf").write_bytes(b"junk" * 100)
        LLM(str(text), mmproj_path=str(tmp_path / "junk.gguf"), n_ctx=256)


# ---- tokens and logits -------------------------------------------------------------------


def test_image_token_count_is_what_mtmd_reports(llm):
    from tiny_mmproj import EXPECTED_IMAGE_TOKENS

    mm = llm.multimodal
    p = mm.tokenize(f"USER: {mm.marker}\nWhat is it?\nASSISTANT:", [mm.load_file(JPEG)])
    kinds = p.chunks_info()
    assert [c["kind"] for c in kinds] == ["text", "image", "text"]
    assert kinds[1]["n_tokens"] == EXPECTED_IMAGE_TOKENS == p.n_media_tokens
    start, n, idx = p.spans[0]
    assert (n, idx) == (EXPECTED_IMAGE_TOKENS, 1) and start == kinds[0]["n_tokens"]
    assert len(p) == sum(c["n_tokens"] for c in kinds)
    assert all(t < 0 for t in p.tokens[start:start + n]) and len(set(p.tokens[start:start + n])) == 1
    assert p.text_tokens() == [t for t in p.tokens if t >= 0]


def _last_logits(llm, prompt):
    ctx = _core.Context(llm.model, n_ctx=256, n_threads=1)
    try:
        n_past = llm.multimodal.eval(ctx, prompt)
        assert n_past == len(prompt)
        return np.array(ctx.logits(-1), copy=True)
    finally:
        ctx.close()


def test_images_change_the_logits_and_equal_images_do_not(llm):
    mm = llm.multimodal
    text = f"USER: {mm.marker}\nDescribe.\nASSISTANT:"
    jpeg_a = mm.tokenize(text, [mm.load_file(JPEG)])
    jpeg_b = mm.tokenize(text, [mm.load(JPEG.read_bytes())])      # same image, loaded again
    red = mm.tokenize(text, [mm.load(png_bytes(32, 32))])
    blue = mm.tokenize(text, [_core.Bitmap.from_rgb(bytes([10, 10, 200]) * 32 * 32, 32, 32)])
    la, lb, lr, lu = (_last_logits(llm, p) for p in (jpeg_a, jpeg_b, red, blue))
    assert np.isfinite(la).all()
    assert np.array_equal(la, lb)
    assert np.abs(la - lr).max() > 1e-3
    assert np.abs(lr - lu).max() > 1e-3


def test_encode_is_cached_within_a_prompt_and_across_requests(llm):
    mm = llm.multimodal
    mm.clear_cache()
    before = mm.cache_info()
    img = mm.load(png_bytes(24, 24, (1, 2, 3)))
    twice = mm.tokenize(f"{mm.marker} and {mm.marker}: same?", [img, img])
    assert twice.n_media == 2
    first = mm.encode(twice, twice.spans[0][2])
    second = mm.encode(twice, twice.spans[1][2])
    assert np.array_equal(first, second)
    after = mm.cache_info()
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 1
    # Across requests, through the engine: the same image again is a hit, not an encode.
    chat = image_chat(png_bytes(24, 24, (1, 2, 3)))
    llm.chat(chat)
    assert mm.cache_info()["misses"] == after["misses"]
    assert mm.cache_info()["hits"] > after["hits"]


# ---- generation -----------------------------------------------------------------------------


def test_greedy_image_chat_is_deterministic_and_sees_the_image(llm):
    url = data_url(JPEG.read_bytes(), "image/jpeg")
    a = llm.chat(image_chat(url), max_tokens=12)
    b = llm.chat(image_chat(str(JPEG)), max_tokens=12)                 # a local path
    c = llm.chat(image_chat(JPEG.as_uri()), max_tokens=12)             # a file:// URL
    assert a.text == b.text == c.text and len(a.tokens) == 12
    from tiny_mmproj import EXPECTED_IMAGE_TOKENS

    prompt = llm.chat_prompt(image_chat(url))
    assert isinstance(prompt, _core.MediaPrompt) and prompt.n_media_tokens == EXPECTED_IMAGE_TOKENS
    assert a.prompt_tokens == len(prompt)
    # A MediaPrompt given directly is the same request.
    assert llm.complete(prompt, max_tokens=12).text == a.text


def test_prompt_cache_reuses_an_image_prefix(llm):
    chat = image_chat(png_bytes(16, 16, (5, 6, 7)), "first question")
    llm.chat(chat, max_tokens=2)
    again = llm.chat(chat[:1] + [], max_tokens=2)
    from tiny_mmproj import EXPECTED_IMAGE_TOKENS

    assert again.usage["prompt_tokens_details"]["cached_tokens"] >= EXPECTED_IMAGE_TOKENS


def test_a_batch_of_image_chats_equals_one_at_a_time(llm):
    chats = [image_chat(png_bytes(16 + i, 16, (30 * i, 200 - 20 * i, 7)), f"question {i}") for i in range(5)]
    chats.append([{"role": "user", "content": "a chat without an image"}])
    one_by_one = [llm.chat(c, max_tokens=10).text for c in chats]
    batched = llm.generate(chats, max_tokens=10)
    assert [c.text for c in batched] == one_by_one
    streamed = {}
    for i, piece in llm.generate_stream(chats, max_tokens=10):
        streamed[i] = streamed.get(i, "") + piece
    assert [streamed.get(i, "") for i in range(len(chats))] == one_by_one


def test_n_greater_than_one_shares_the_image(llm):
    one = llm.chat(image_chat(str(JPEG)), max_tokens=6)
    many = llm.chat(image_chat(str(JPEG)), max_tokens=6, n=3)
    assert [c.text for c in many] == [one.text] * 3


def test_penalties_see_an_image_prompt_text_only(llm):
    """Penalties and DRY are shown the prompt's text tokens; the image's positions (negative
    keys) are skipped, not passed to llama.cpp as token ids."""
    prompt = llm.chat_prompt(image_chat(str(JPEG)))
    assert any(k < 0 for k in prompt.tokens)
    plain = llm.chat(image_chat(str(JPEG)), max_tokens=8)
    penalised = llm.chat(image_chat(str(JPEG)), max_tokens=8, repeat_penalty=1.5, last_n_tokens_size=-1,
                         dry_multiplier=0.8)
    assert len(penalised.tokens) == 8 and len(plain.tokens) == 8


def test_preempted_image_request_resumes_with_the_same_output(pair):
    text, proj = pair
    # Two slots, a context (256 cells) that fits one long sequence: a paused request...
    with LLM(str(text), mmproj_path=str(proj), n_ctx=128, n_parallel=2, kv_unified=True, n_threads=1,
             chat_template="chatml", temperature=0.0) as small:
        chat = image_chat(str(JPEG))
        alone = small.chat(chat, max_tokens=180).text
        small.reset()
        s1 = small.chat(chat, max_tokens=180, stream=True)
        first = next(iter(s1))                 # started, then left paused
        # ...and the second needs the cells the paused one holds: it is preempted, and later
        # re-evaluates its prompt -- the image included -- from its recorded positions.
        other = small.chat(image_chat(png_bytes(20, 20)), max_tokens=180)
        assert small._engine.n_preemptions >= 1
        rest = "".join(s1)
        assert first + rest == alone
        assert len(other.tokens) == 180


def test_tools_with_an_image_call_the_tool_and_see_the_image(pair):
    """chat(tools=...) goes through pyllama.tools, which must keep the image: a forced tool call
    parses, and its prompt holds the image's tokens."""
    import json

    from tiny_mmproj import EXPECTED_IMAGE_TOKENS

    text, proj = pair
    tool = {"type": "function", "function": {"name": "describe", "parameters": {
        "type": "object", "properties": {"colour": {"enum": ["red", "blue"]}},
        "required": ["colour"], "additionalProperties": False}}}
    # The tool's schema in the prompt takes ~220 tokens of this byte-level vocabulary: one slot.
    with LLM(str(text), mmproj_path=str(proj), n_ctx=1024, n_threads=1, chat_template="chatml",
             temperature=0.0) as llm:
        text_only = llm.chat([{"role": "user", "content": "What colour?"}], tools=[tool],
                             tool_choice="describe", max_tokens=200)
        comp = llm.chat(image_chat(str(JPEG), "What colour?"), tools=[tool], tool_choice="describe",
                        max_tokens=200)
        assert comp.finish_reason == "tool_calls", (comp.text, comp.prompt_tokens, len(comp.tokens))
        (call,) = comp.tool_calls
        assert call["function"]["name"] == "describe"
        assert set(json.loads(call["function"]["arguments"])) == {"colour"}
        assert comp.prompt_tokens >= text_only.prompt_tokens + EXPECTED_IMAGE_TOKENS
        # Files stay refused through the tools path when the caller says so (the server does).
        with pytest.raises(MediaError):
            llm.chat(image_chat(str(JPEG)), tools=[tool], tool_choice="describe", allow_files=False)


def test_media_prompt_works_with_complete_and_threads(llm):
    mm = llm.multimodal
    prompt = mm.tokenize(f"<|im_start|>user\n{mm.marker}\nWhat?<|im_end|>\n<|im_start|>assistant\n",
                         [mm.load_file(JPEG)])
    ref = llm.complete(prompt, max_tokens=6).text
    out = [None] * 4
    errors = []

    def work(i):
        try:
            out[i] = llm.complete(prompt, max_tokens=6).text
        except BaseException as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and out == [ref] * 4


def test_async_image_chat(llm):
    import asyncio

    async def main():
        return await asyncio.gather(*(llm.achat(image_chat(str(JPEG)), max_tokens=5) for _ in range(3)))

    res = asyncio.run(main())
    assert len({c.text for c in res}) == 1


# ---- bad input ----------------------------------------------------------------------------


def test_bad_media_gives_clear_errors(llm, pair, tmp_path):
    mm = llm.multimodal
    jpeg = JPEG.read_bytes()
    with pytest.raises(MediaError, match="truncated|corrupt"):
        mm.load(jpeg[:300])
    with pytest.raises(MediaError, match="not an image"):
        mm.load(b"hello, this is a text file\n" * 10)
    with pytest.raises(MediaError, match="empty"):
        mm.load(b"")
    with pytest.raises(MediaError, match="0x0|size of 0"):
        mm.load(png_bytes(1, 1, declared=(0, 0)))
    with pytest.raises(MediaError, match="max_pixels"):
        mm.load(png_bytes(1, 1, declared=(100000, 100000)))
    with pytest.raises(MediaError, match="WebP"):
        mm.load(b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 64)
    with pytest.raises(MediaError, match="audio"):
        mm.load(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 64)
    with pytest.raises(MediaError, match="marker"):
        mm.tokenize(f"{mm.marker} {mm.marker}", [mm.load(jpeg)])
    with pytest.raises(MediaError, match="ends with"):
        mm.tokenize(f"look: {mm.marker}", [mm.load(jpeg)])
    with pytest.raises(MediaError, match="remote"):
        llm.chat(image_chat("https://example.com/cat.png"))
    with pytest.raises(MediaError, match="base64"):
        llm.chat(image_chat("data:image/png;base64,@@@not base64@@@"))
    with pytest.raises(FileNotFoundError):
        llm.chat(image_chat(str(tmp_path / "nope.png")))
    with pytest.raises(MediaError, match="data: URL"):
        llm.chat_prompt(image_chat(str(JPEG)), allow_files=False)
    with pytest.raises(MediaError, match="chat_prompt"):
        llm.chat_tokens(image_chat(str(JPEG)))
    with pytest.raises(MediaError, match="echo"):
        llm.complete(llm.chat_prompt(image_chat(str(JPEG))), logprobs=True, echo=True)
    # A model loaded without a projector.
    with LLM(str(pair[0]), n_ctx=256, chat_template="chatml") as plain:
        with pytest.raises(MediaError, match="without a projector"):
            plain.chat(image_chat(str(JPEG)))
    # More images than the context holds.
    with LLM(str(pair[0]), mmproj_path=str(pair[1]), n_ctx=64, chat_template="chatml") as tight:
        many = [{"role": "user", "content": [{"type": "image", "image": str(JPEG)}] * 20
                 + [{"type": "text", "text": "all of them?"}]}]
        with pytest.raises(ContextLengthError):
            tight.chat(many, max_tokens=4)
        assert len(tight.chat(image_chat(str(JPEG)), max_tokens=2).tokens) == 2   # still usable
    # Nothing was lost: the shared LLM still answers.
    assert len(llm.chat(image_chat(str(JPEG)), max_tokens=2).tokens) == 2


def test_crash_prone_media_in_a_subprocess(pair, run_python, tmp_path):
    """Decompression bombs, corrupt headers with plausible sizes, garbage projectors and a
    projector for another model: each must raise, not abort or allocate the machine away."""
    text, proj = pair
    code = textwrap.dedent(f"""
        import struct, zlib
        from pyllama import _core
        from pyllama.errors import MediaError, ModelLoadError
        from tiny_mmproj import make_mismatched_mmproj
        from tiny_model import make_truncated
        m = _core.Model({str(text)!r})
        mm = _core.Multimodal(m, {str(proj)!r})
        jpeg = open({str(JPEG)!r}, "rb").read()
        cases = {{
            "bomb png": b"\\x89PNG\\r\\n\\x1a\\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0) + b"\\0" * 40 + b"\\0\\0\\0\\0IEND\\xaeB`\\x82",
            "bomb gif": b"GIF89a" + struct.pack("<HH", 60000, 60000) + b"\\0" * 40 + b";",
            "bomb bmp": b"BM" + b"\\0" * 12 + struct.pack("<Iii", 40, 50000, 50000) + b"\\0" * 40,
            "jpeg header only": jpeg[:600],
            "jpeg cut in the middle": jpeg[: len(jpeg) // 2],
            "png without data": b"\\x89PNG\\r\\n\\x1a\\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0),
            "gif without data": b"GIF89a" + struct.pack("<HH", 8, 8) + b"\\0" * 8,
            "random": bytes(range(256)) * 8,
        }}
        for name, data in cases.items():
            try:
                b = mm.load(data)
            except MediaError as e:
                print("ok", name, "|", e)
            else:
                # stb_image may decode a damaged file partially; then it must still be usable.
                p = mm.tokenize(mm.marker + " x", [b])
                mm.encode(p, p.spans[0][2])
                print("ok", name, "| decoded", b)
        for name, path in (("truncated projector", make_truncated({str(proj)!r}, {str(tmp_path / 'cut.gguf')!r}, 5000)),
                           ("mismatched projector", make_mismatched_mmproj({str(tmp_path / 'wide.gguf')!r})),
                           ("text model as projector", {str(text)!r})):
            try:
                _core.Multimodal(m, str(path))
            except (ModelLoadError, MediaError) as e:
                print("ok", name, "|", e)
        print("done")
    """)
    res = run_python(code, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ok ")]
    assert len(lines) == 11, res.stdout
    assert res.stdout.strip().endswith("done")
    for name in ("bomb png", "bomb gif", "bomb bmp"):
        assert any(ln.startswith(f"ok {name} |") and "max_pixels" in ln for ln in lines), res.stdout


# ---- the command line and the server ---------------------------------------------------------


def test_cli_run_with_image(pair, llm):
    from test_cli import _one_error_line, cli

    text, proj = pair
    args = ("run", "-m", text, "--mmproj", proj, "--chat-template", "chatml", "-t", "1", "--temp", "0", "-n", "8")
    res = cli(*args, "--image", JPEG, "What is in this image?")
    assert res.returncode == 0, res.stderr
    want = llm.chat(image_chat(str(JPEG)), max_tokens=8).text
    assert res.stdout.rstrip("\n") == want
    # Errors: one line each, usage exit status, no traceback.
    res = cli("run", "-m", text, "--image", JPEG, "x")
    assert res.returncode == 2 and "--mmproj" in _one_error_line(res)
    res = cli(*args, "--image", str(JPEG) + ".missing", "x")
    assert res.returncode == 2 and "no such file" in _one_error_line(res)
    bad = Path(proj).with_name("not-an-image.png")
    bad.write_bytes(b"plain text, not a picture\n" * 4)
    res = cli(*args, "--image", bad, "x")
    assert res.returncode == 2 and "not an image" in _one_error_line(res)


def test_server_with_mmproj_answers_the_openai_client(pair, llm):
    openai = pytest.importorskip("openai")
    from server_process import ServerProcess

    text, proj = pair
    url = data_url(JPEG.read_bytes(), "image/jpeg")
    server = ServerProcess("-m", str(text), "--mmproj", str(proj), "-np", "2", "-c", "1024", "-t", "1",
                           "--chat-template", "chatml")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What is in this image?"}]}]
        want = llm.chat(image_chat(url), max_tokens=8)
        got = client.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0)
        assert got.choices[0].message.content == want.text
        assert got.usage.prompt_tokens == want.prompt_tokens
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="x", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices]
        assert "".join(pieces) == want.text
        # A client may not make the server read its files, nor fetch URLs.
        for ref in (str(JPEG), JPEG.as_uri(), "https://example.com/a.png", "data:image/png;base64,AAAA"):
            bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}},
                                                {"type": "text", "text": "x"}]}]
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model="x", messages=bad, max_tokens=2)
        assert client.chat.completions.create(model="x", messages=messages, max_tokens=2).choices
    finally:
        assert server.stop() == 0


def test_server_without_mmproj_refuses_images_with_a_400(pair):
    openai = pytest.importorskip("openai")
    from server_process import ServerProcess

    server = ServerProcess("-m", str(pair[0]), "-np", "1", "-c", "512", "-t", "1", "--chat-template", "chatml")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(JPEG.read_bytes(), "image/jpeg")}},
            {"type": "text", "text": "x"}]}]
        with pytest.raises(openai.BadRequestError, match="--mmproj"):
            client.chat.completions.create(model="x", messages=messages, max_tokens=2)
    finally:
        assert server.stop() == 0
