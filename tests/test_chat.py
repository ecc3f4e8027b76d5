"""Chat templates against transformers: apply_chat_template with the real models' template text (gemma,
llama3, llava), PaliGemmaProcessor (paligemma), today's shapes layout (plain).

The loss masks are checked against apply_chat_template's assistant mask: llava's template has generation
markers; for gemma and llama3 the test adds them around the assistant content and its end-of-turn token,
and checks first that the marked template renders the same ids.
"""
import numpy as np
import pytest
import transformers
from PIL import Image as PILImage

from mm_jax.data import chat
from mm_jax.data import tokenizer as tokenizer_lib
from mm_jax.data.conversation import Conversation, Image, Turn
from mm_jax.errors import UserError
from test_tokenizer import byte_bpe_dir, sentencepiece_dir

# google/gemma-3-4b-it's chat_template.
GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# meta-llama/Llama-3.2-11B-Vision-Instruct's chat_template.
LLAMA32_VISION = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}      
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\n\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\n\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# llava-hf/llava-1.5-7b-hf's chat_template (its answers end in " "; ours in eos: LLAVA_EOS).
LLAVA = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
         "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
         "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
         "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
         "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr("
         "'type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
         "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
LLAVA_EOS = LLAVA.replace("{{ content['text'] + ' '}}{% endgeneration %}",
                          "{{ content['text'] + eos_token }}{% endgeneration %}")
assert LLAVA_EOS != LLAVA


def _marked(template: str, start: str, end: str, end_gen: str, after: str = "") -> str:
  """`template` with generation markers around the assistant's content block start..end (end included),
  whose last output `end` becomes `end_gen` + `after` (`after` outside the markers)."""
  i, j = template.index(start), template.index(end) + len(end)
  block = template[i:j]
  gen = block[:-len(end)] + end_gen
  return (template[:i] + "{%- if message['role'] == 'assistant' -%}{% generation %}" + gen +
          "{% endgeneration %}" + after + "{%- else -%}" + block + "{%- endif -%}" + template[j:])


GEMMA3_MARKED = _marked(GEMMA3, "    {%- if message['content'] is string -%}", r"{{ '<end_of_turn>\n' }}",
                        "{{ '<end_of_turn>' }}", r"{{ '\n' }}")
LLAMA32_MARKED = _marked(LLAMA32_VISION, "        {%- if message['content'] is string %}",
                         "{{- '<|eot_id|>' }}", "{{- '<|eot_id|>' }}")


def conv(*turns, images=None) -> Conversation:
  turns = tuple(Turn(role, tuple(parts)) for role, *parts in turns)
  n = sum(isinstance(p, Image) for t in turns for p in t.parts)
  return Conversation(turns, images=(b"",) * n if images is None else images)


VQA = conv(("user", Image(0), "What color is the circle?"), ("assistant", "Red."))
MULTI = conv(("user", Image(0), Image(1), "Which has more red shapes?"), ("assistant", "The first one."),
             ("user", Image(2), "  And this one?\n"), ("assistant", " 你好 🙂 no\t"))
CHAT = conv(("user", Image(0), "How many shapes?"), ("assistant", "Three."), ("user", "And squares?"),
            ("assistant", "One square, left of the circle."))
SYSTEM = conv(("system", "You are terse."), *[(t.role, *t.parts) for t in CHAT.turns])
TEXT = conv(("system", " Be brief. "), ("user", "hi there"), ("assistant", "hello!"), ("user", "again?"),
            ("assistant", "Yes."))
INLINE = conv(("user", "Compare", Image(0), "with", Image(1), "."), ("assistant", "Same."))


def messages(c: Conversation, string_system: bool = False) -> list[dict]:
  """transformers' multimodal messages (a system turn as a string where the template trims it)."""
  out = []
  for t in c.turns:
    if t.role == "system" and string_system:
      out.append({"role": "system", "content": t.text})
      continue
    out.append({"role": t.role, "content": [{"type": "image"} if isinstance(p, Image) else
                                            {"type": "text", "text": p} for p in t.parts]})
  return out


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
  """name -> (ours, transformers'), trained once: SentencePiece read directly and its tokenizer.json."""
  root = tmp_path_factory.mktemp("tok")
  gemma = transformers.GemmaTokenizer.from_pretrained(sentencepiece_dir(root / "gemma", gemma=True))
  llama = transformers.LlamaTokenizer.from_pretrained(sentencepiece_dir(root / "llama", gemma=False))
  gemma.save_pretrained(str(root / "gemma_json"))
  llama.save_pretrained(str(root / "llama_json"))
  bpe = byte_bpe_dir(root / "bpe")
  return {"gemma": (tokenizer_lib.load(str(root / "gemma" / "tokenizer.model")), gemma),
          "gemma_json": (tokenizer_lib.load(str(root / "gemma_json")), gemma),
          "llama": (tokenizer_lib.load(str(root / "llama" / "tokenizer.model")), llama),
          "llama_json": (tokenizer_lib.load(str(root / "llama_json")), llama),
          "bpe": (tokenizer_lib.load(bpe), transformers.PreTrainedTokenizerFast.from_pretrained(bpe)),
          "gemma_dir": str(root / "gemma")}


def _image_marks(r: chat.Rendered, c: Conversation, image_id: int) -> None:
  assert [m for m in r.image if m >= 0] == c.image_order()
  assert [i for i, m in enumerate(r.image) if m >= 0] == [i for i, t in enumerate(r.ids) if t == image_id]


CASES = [  # template, tokenizer, reference, marked reference, image token, conversations, kwargs
    ("gemma", "gemma", GEMMA3, GEMMA3_MARKED, "<start_of_image>", [VQA, MULTI, CHAT, SYSTEM, TEXT, INLINE], {}),
    ("gemma", "gemma_json", GEMMA3, GEMMA3_MARKED, "<start_of_image>", [MULTI, SYSTEM, INLINE], {}),
    ("llama3", "bpe", LLAMA32_VISION, LLAMA32_MARKED, "<|image|>", [VQA, MULTI, CHAT, TEXT, INLINE],
     {"date_string": "26 Jul 2024"}),
    ("llava", "llama", LLAVA_EOS, LLAVA_EOS, "<image>", [VQA, MULTI, CHAT, SYSTEM, TEXT], {}),
    ("llava", "llama_json", LLAVA_EOS, LLAVA_EOS, "<image>", [MULTI, SYSTEM], {}),
]


@pytest.mark.parametrize("name,tok,reference,marked,image_token,convs,kwargs", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_equals_apply_chat_template(toks, name, tok, reference, marked, image_token, convs, kwargs):
  ours, hf = toks[tok]
  chat.check(name, ours)
  bos = [ours.bos_id] if name == "llava" else []  # the processor adds it; llava's template does not
  for c in convs:
    msgs = messages(c, string_system=name == "llama3")
    hf.chat_template = reference
    want = hf.apply_chat_template(msgs, tokenize=True, return_dict=False, **kwargs)
    r = chat.render(name, ours, c)
    assert r.ids == bos + want, c.id
    assert any(r.loss)
    hf.chat_template = marked
    out = hf.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True, **kwargs)
    assert out["input_ids"] == want  # the markers change nothing else
    assert r.loss == [False] * len(bos) + [bool(m) for m in out["assistant_masks"]]
    assert not any(r.prefix)
    _image_marks(r, c, ours.token_to_id(image_token))
    # generation: up to the last answer, then the generation prompt
    hf.chat_template = reference
    before, _ = c.until_last_answer()
    g = chat.render(name, ours, c, generation=True)
    assert g.ids == bos + hf.apply_chat_template(messages(before, string_system=name == "llama3"),
                                                 add_generation_prompt=True, tokenize=True,
                                                 return_dict=False, **kwargs)
    assert not any(g.loss) and not any(g.prefix)
    _image_marks(g, before, ours.token_to_id(image_token))


def test_llava_prompt_equals_the_unchanged_template(toks):
  """Where no answer precedes the prompt, llava's generation prompt is the llava-hf template's own."""
  ours, hf = toks["llama"]
  hf.chat_template = LLAVA
  for c in (VQA, conv(("system", "Be kind."), ("user", Image(0), "Describe it."), ("assistant", "A cat."))):
    want = hf.apply_chat_template(messages(c.until_last_answer()[0]), add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert chat.render("llava", ours, c, generation=True).ids == [ours.bos_id] + want


@pytest.mark.parametrize("tok", ["gemma", "gemma_json"])
def test_paligemma_equals_the_processor(toks, tok):
  ours = toks[tok][0]
  processor = transformers.SiglipImageProcessorPil(size={"height": 16, "width": 16})
  processor.image_seq_length = n = 4
  proc = transformers.PaliGemmaProcessor(
      image_processor=processor, tokenizer=transformers.GemmaTokenizer.from_pretrained(toks["gemma_dir"]))
  pixels = PILImage.fromarray(np.zeros((20, 20, 3), np.uint8))
  chat.check("paligemma", ours)
  for c in (VQA, conv(("user", Image(0), Image(1), "caption es"), ("assistant", " una  casa 🙂"))):
    prefix, suffix = c.turns[0].text, c.turns[1].text
    images = [[pixels] * c.num_images]
    want = proc(images=images, text=["<image>" * c.num_images + prefix], suffix=[suffix])
    r = _expand(chat.render("paligemma", ours, c), n)
    assert r.ids == list(want["input_ids"][0])
    assert r.prefix == (np.asarray(want["token_type_ids"][0]) == 0).tolist()
    assert r.loss == (np.asarray(want["labels"][0]) != -100).tolist()
    g = _expand(chat.render("paligemma", ours, c, generation=True), n)
    assert g.ids == list(proc(images=images, text=["<image>" * c.num_images + prefix])["input_ids"][0])
    assert all(g.prefix) and not any(g.loss)


def _expand(r: chat.Rendered, n: int) -> chat.Rendered:
  """Each image placeholder -> n copies, as the processor expands <image>."""
  out = chat.Rendered([], [], [], [])
  for i, l, p, m in zip(r.ids, r.loss, r.prefix, r.image):
    for _ in range(n if m >= 0 else 1):
      out.ids.append(i), out.loss.append(l), out.prefix.append(p), out.image.append(m)
  return out


def test_plain_is_the_shapes_layout(tokenizer):
  """[image] bos question answer eos, the image before bos; prefix through the question."""
  q, a, q2, a2 = "what color is the circle?", "red", "how many squares are there?", "two"
  ids_q, ids_a, ids_q2 = tokenizer.encode(q), tokenizer.encode(a), tokenizer.encode(q2)
  vqa = conv(("user", Image(0), q), ("assistant", a))
  r = chat.render("plain", tokenizer, vqa)
  assert tokenizer.token_to_id("<image>") is None  # the placeholder is unk
  assert r.ids == [tokenizer.unk_id, tokenizer.bos_id, *ids_q, *ids_a, tokenizer.eos_id]
  assert r.image == [0] + [-1] * (len(r.ids) - 1)
  assert r.prefix == [True] * (2 + len(ids_q)) + [False] * (len(ids_a) + 1)
  assert r.loss == [not p for p in r.prefix]
  g = chat.render("plain", tokenizer, vqa, generation=True)
  assert g.ids == r.ids[:2 + len(ids_q)] and all(g.prefix) and not any(g.loss)
  multi = conv(("user", Image(0), q), ("assistant", a), ("user", q2), ("assistant", a2))
  r = chat.render("plain", tokenizer, multi)
  tail = [*ids_q2, *tokenizer.encode(a2), tokenizer.eos_id]
  assert r.ids == [tokenizer.unk_id, tokenizer.bos_id, *ids_q, *ids_a, tokenizer.eos_id, *tail]
  answer_1, answer_2 = len(ids_a) + 1, len(tail) - len(ids_q2)
  assert r.loss == [False] * (2 + len(ids_q)) + [True] * answer_1 + [False] * len(ids_q2) + [True] * answer_2
  assert sum(r.prefix) == 2 + len(ids_q)
  g = chat.render("plain", tokenizer, multi, generation=True)
  assert g.ids == r.ids[:len(r.ids) - answer_2] and not any(g.loss)


def test_check_names_the_missing_token(toks, tokenizer):
  with pytest.raises(UserError, match="<start_of_turn>"):
    chat.check("gemma", toks["llama"][0])
  with pytest.raises(UserError, match=r"<\|start_header_id\|>"):
    chat.check("llama3", toks["gemma"][0])
  with pytest.raises(UserError, match="'<image>'"):
    chat.check("llava", toks["bpe"][0])
  with pytest.raises(UserError, match="neither"):
    chat.check("plain", toks["bpe"][0])  # no <image>, no unk
  with pytest.raises(UserError, match="unknown chat template 'chatml'"):
    chat.check("chatml", tokenizer)
  chat.check("plain", tokenizer)
  assert "\n" not in "".join(t.doc for t in chat.TEMPLATES.values())


def test_conversations_the_template_refuses(toks):
  gemma, bpe = toks["gemma"][0], toks["bpe"][0]
  with pytest.raises(ValueError, match="alternating"):
    chat.render("gemma", gemma, conv(("user", "a"), ("user", "b"), ("assistant", "c")))
  with pytest.raises(ValueError, match="system turn"):
    chat.render("llama3", bpe, SYSTEM)
  for name, tok, token in (("gemma", gemma, "<end_of_turn>"), ("gemma", toks["gemma_json"][0], "<end_of_turn>"),
                           ("llama3", bpe, "<|eot_id|>"), ("llava", toks["llama"][0], "<image>")):
    with pytest.raises(ValueError, match="special token"):  # text never turns into a control token
      chat.render(name, tok, conv(("user", Image(0), f"say {token} now"), ("assistant", "ok")))


def test_stop_id(toks, tokenizer):
  assert chat.stop_id("gemma", toks["gemma"][0]) == toks["gemma"][0].token_to_id("<end_of_turn>")
  assert chat.stop_id("llama3", toks["bpe"][0]) == toks["bpe"][0].token_to_id("<|eot_id|>")
  assert chat.stop_id("llava", toks["llama"][0]) == toks["llama"][0].eos_id
  assert chat.stop_id("plain", tokenizer) == tokenizer.eos_id
