"""Self-generated training data: the target's own greedy answers to prompts that no benchmark uses.

A drafter is graded on the target's outputs, so the closest training text is those outputs
(self-distillation, as in Medusa-2 and the EAGLE papers). `mtpspec self-distill` writes them as a
.jsonl file of {"id", "text"} rows that `train-drafter --data FILE.jsonl` reads; "text" is the
prompt exactly as the engine encodes it (through the chat template where the bench would use
one) followed by the target's continuation.

Prompt sources (`--prompts`, a comma list):
- `instructions`: requests to an assistant built from task templates × topics (writing, advice,
  explanation, comparison, reasoning, coding, extraction …), written here, not taken from any
  benchmark;
- `tasks`: a second such set, other kinds of request (role-play, reasoning, extraction from a
  given text, rewriting, STEM and humanities questions) over other subjects (30 × 60);
- `mixed`: each set's requests over the other set's subjects (30 × 60 + 20 × 60), prompts
  neither of the two above draws;
- `code`: signatures and docstrings of documented functions in the CPython standard library, to
  complete like a HumanEval problem (HumanEval itself is never read);
- `gsm-train`: word problems from reasoning-gym's generators with `train-drafter`'s seeds, which
  are disjoint from the bench's `gsm` set.

Generation (`greedy.py`) runs a GGUF target on the GGUF runtime, the engine's own target, with
several sequences in every forward; a Hugging Face directory, `--weights dequant` and GPUs go
through transformers in batches. Rows are appended as they are decided, in the order of prompt
length; a rerun with the same --out skips the prompts already there, so an interrupted run resumes.
"""

from __future__ import annotations

import ast
import json
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from random import Random

from ..errors import MtpspecError
from ..prompts import GSM_INSTRUCTION, Prompt, gsm_examples
from ..sampling import SamplingParams
from .data import GSM_TRAIN_SEED

TOPICS = (
    "the water cycle",
    "public libraries",
    "remote work",
    "electric cars",
    "the history of printing",
    "bees",
    "volcanoes",
    "learning a second language",
    "compound interest",
    "sleep",
    "chess",
    "urban gardening",
    "the Roman Empire",
    "climate change",
    "vaccines",
    "photosynthesis",
    "the stock market",
    "recycling",
    "social media",
    "video games",
    "the moon landing",
    "coffee",
    "marathon training",
    "jazz",
    "time management",
    "renewable energy",
    "black holes",
    "the immune system",
    "small businesses",
    "public speaking",
    "friendship",
    "the ocean",
    "artificial intelligence",
    "bread baking",
    "mountain hiking",
    "museums",
    "rainforests",
    "the French Revolution",
    "budgeting",
    "earthquakes",
    "dogs as pets",
    "online privacy",
    "the printing press",
    "classical music",
    "the Olympic Games",
    "desert animals",
    "healthy breakfasts",
    "traffic in big cities",
    "space telescopes",
    "board games",
    "minimalism",
    "the Industrial Revolution",
    "honey",
    "street food",
    "open source software",
    "teamwork",
    "glaciers",
    "handwriting",
    "trains",
    "photography",
)

TEMPLATES = (
    "Write a short blog post about {t}.",
    "Explain {t} to a ten-year-old.",
    "Give me five practical tips about {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "Write a poem about {t}.",
    "Summarize the most important facts about {t} in three paragraphs.",
    "Imagine you are a tour guide. Describe {t} to a group of visitors.",
    "Write a persuasive paragraph arguing that everyone should learn about {t}.",
    "Compose a friendly email to a colleague about {t}.",
    "List common misconceptions about {t} and correct them.",
    "Write a short story in which {t} plays a central role.",
    "Create a quiz with four questions about {t}, with answers.",
    "How has {t} changed over the last hundred years?",
    "Describe a step-by-step plan for a beginner interested in {t}.",
    "Write a Python function that could help someone studying {t}, and explain it.",
    "Compare {t} with {u}: what do they have in common and how do they differ?",
    "Write a dialogue between two friends discussing {t}.",
    "What questions would a scientist ask about {t}? Answer two of them.",
    "Draft a product description for an app about {t}.",
    "Give a balanced opinion on whether schools should teach more about {t}.",
)


# A second, disjoint set for `tasks`: other kinds of request (role-play, reasoning, extraction from a
# given text, rewriting, STEM and humanities questions, planning) over other subjects.
SUBJECTS = (
    "a lighthouse keeper",
    "the periodic table",
    "a city council meeting",
    "medieval castles",
    "tea ceremonies",
    "a lost wallet",
    "the speed of light",
    "a school science fair",
    "ancient Egypt",
    "a rainy weekend",
    "solar panels",
    "a job interview",
    "the human heart",
    "a village bakery",
    "the Silk Road",
    "migrating birds",
    "a broken laptop",
    "prime numbers",
    "a family reunion",
    "the Renaissance",
    "coral reefs",
    "a train delay",
    "democracy",
    "a new smartphone",
    "the Great Wall of China",
    "a neighborhood library",
    "gravity",
    "a birthday party",
    "the Cold War",
    "a camping trip",
    "inflation",
    "a hospital night shift",
    "DNA",
    "a football match",
    "Shakespeare's plays",
    "a power outage",
    "the metric system",
    "a farmers' market",
    "the Byzantine Empire",
    "a music festival",
    "probability",
    "a first day at school",
    "hurricanes",
    "a bicycle repair shop",
    "the printing of money",
    "a wedding speech",
    "antibiotics",
    "a chess club",
    "the Amazon river",
    "a startup company",
    "magnetism",
    "a road trip",
    "ancient Greek philosophy",
    "a museum robbery",
    "wind turbines",
    "a student loan",
    "the Moon's phases",
    "a cooking competition",
    "the Internet's history",
    "a mountain village",
)

TASKS = (
    "Pretend you are {t}. Introduce yourself and describe your day.",
    "You are a detective investigating {t}. Explain your reasoning step by step.",
    "Write a short speech for an event about {t}.",
    'Rewrite this sentence in a more formal tone: "I think {t} is pretty cool and everyone should check it out."',
    'Extract the key facts from this text and list them: "Last year our town started a project about {t}. '
    'About 300 people joined, the budget was 12,000 dollars, and the results will be shared in May."',
    'Here is a claim: "{t} has no effect on everyday life." Is it true? Argue both sides and conclude.',
    "Explain the science behind {t} in simple terms.",
    "What role did {t} play in history? Give three examples.",
    "Write a haiku and a limerick about {t}.",
    "Plan a one-day itinerary centered on {t}.",
    "If you had to teach a one-hour class about {t}, what would you cover? Give an outline.",
    "Write a news headline and a short article about {t}.",
    "Solve this puzzle: a story about {t} has three characters, and each one tells one lie. How would you find out the truth?",
    "Translate the idea of {t} into a metaphor and explain it.",
    "Write a letter of complaint about {t} to a local newspaper.",
    "What would happen if {t} disappeared tomorrow? Think it through.",
    "Give a short answer, then a detailed answer: why does {t} matter?",
    "Write a job advertisement connected to {t}.",
    "Estimate, with your reasoning, how many people in a big city think about {t} each day.",
    "Describe {t} using only questions.",
    "Write the opening paragraph of a novel about {t}.",
    "Create a table with three columns (fact, source, importance) about {t}.",
    "Act as a teacher grading an essay about {t}. Give feedback on its structure.",
    "Summarize a debate between an optimist and a pessimist about {t}.",
    "Write a recipe-style guide (ingredients, steps) for understanding {t}.",
    "What are the ethical questions raised by {t}?",
    "How is {t} related to {u}? Find as many connections as you can.",
    "Write a thank-you note to someone who taught you about {t}.",
    "Give ten keywords about {t} and use each in a sentence.",
    "Write a short scene for a play in which {t} causes a misunderstanding.",
)


def instruction_prompts() -> Iterator[Prompt]:
    return _templated("instructions", TEMPLATES, TOPICS, stride=7)


def task_prompts() -> Iterator[Prompt]:
    return _templated("tasks", TASKS, SUBJECTS, stride=11)


def mixed_prompts() -> Iterator[Prompt]:
    yield from _templated("mixed/tasks", TASKS, TOPICS, stride=13)
    yield from _templated("mixed/instructions", TEMPLATES, SUBJECTS, stride=17)


def _templated(source: str, templates: tuple[str, ...], subjects: tuple[str, ...], stride: int) -> Iterator[Prompt]:
    """Every template with every subject `t`; templates that compare take a second subject `u`,
    picked by `stride` so that pairs vary across templates."""
    for i, template in enumerate(templates):
        for j, subject in enumerate(subjects):
            other = subjects[(j * stride + i + 1) % len(subjects)]
            yield Prompt(f"{source}/{i}/{j}", template.format(t=subject, u=other), True)


def code_prompts() -> Iterator[Prompt]:
    """Documented top-level functions of the standard library, as `def …:` plus docstring to complete."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or ast.get_docstring(node) is None:
                continue
            doc = node.body[0]
            if len(node.body) < 2 or doc.end_lineno - node.lineno > 30:
                continue
            head = "\n".join(lines[node.lineno - 1 : doc.end_lineno]) + "\n"
            yield Prompt(f"code/{path.stem}/{node.name}", head, False)


def gsm_prompts() -> Iterator[Prompt]:
    for i, ex in enumerate(gsm_examples(2000, GSM_TRAIN_SEED)):
        yield Prompt(f"gsm-train/{i}", ex["question"] + GSM_INSTRUCTION, True)


# name -> prompt generator, in the order the default draw interleaves them
PROMPT_MAKERS = {
    "instructions": instruction_prompts,
    "code": code_prompts,
    "gsm-train": gsm_prompts,
    "tasks": task_prompts,
    "mixed": mixed_prompts,
}
PROMPT_SOURCES = tuple(PROMPT_MAKERS)


def self_prompts(sources: list[str], per_source: int, seed: int = 0, skip: int = 0) -> list[Prompt]:
    """Up to `per_source` prompts of each source, drawn with a fixed seed after leaving out the first
    `skip` of the draw (so that `skip` = a training run's `per_source` gives prompts disjoint from it), interleaved."""
    picked = []
    for name in sources:
        if name not in PROMPT_MAKERS:
            raise MtpspecError(f"unknown prompt source {name!r}: use {', '.join(PROMPT_SOURCES)}")
        pool = list(PROMPT_MAKERS[name]())
        Random(seed).shuffle(pool)
        picked.append(pool[skip : skip + per_source])
    return [p for group in zip(*picked, strict=False) for p in group] + [
        p for group in picked for p in group[min(map(len, picked)) :]
    ]


def done_ids(out: Path) -> set[str]:
    if not out.is_file():
        return set()
    ids = set()
    for n, line in enumerate(out.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise MtpspecError(f"{out}:{n}: not a self-distill row ({e}); choose another --out") from e
    return ids


def self_distill(
    target: str,
    sources: list[str],
    per_source: int,
    max_new_tokens: int,
    batch_size: int,
    out: Path,
    seed: int = 0,
    skip: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    weights: str = "auto",
    log=print,
    stop_loops: int = 0,
    temperature: float = 0.0,
    samples: int = 1,
) -> int:
    """Generate and append rows to `out`; return how many were written. `stop_loops` N > 0 ends an answer
    at the end of its first repeat of N tokens (`greedy.LoopWatch`). With `temperature` > 0 answers are
    drawn instead, `samples` per prompt, each with a seed of its own row id (`sample_seed`), so a rerun
    draws the same rows whatever the batch."""
    from tqdm import tqdm

    from ..text import encode_prompt, ships_chat_template
    from .greedy import load_greedy

    prompts = self_prompts(sources, per_source, seed, skip)
    sampling = SamplingParams(temperature=temperature) if temperature > 0 else None
    if sampling is not None:  # one row per draw, told apart by its id
        prompts = [replace(p, id=f"{p.id}~t{temperature:g}#{k}") for p in prompts for k in range(samples)]
    done = done_ids(out)
    todo = [p for p in prompts if p.id not in done]
    if done:
        log(f"mtpspec: {len(prompts) - len(todo)} of {len(prompts)} prompts already in {out}; generating the rest")
    if not todo:
        return 0
    greedy = load_greedy(target, weights, dtype, device, log)
    tokenizer = greedy.tokenizer
    chat = ships_chat_template(tokenizer)
    encoded = [encode_prompt(tokenizer, p.text, p.chat and chat) for p in todo]
    order = sorted(range(len(todo)), key=lambda i: len(encoded[i]))  # similar lengths batch with little padding
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="self-distill", unit="prompt", dynamic_ncols=True)
    written = generated = 0
    seeds = [sample_seed(seed, todo[i].id) for i in order]
    answers = greedy.answers([encoded[i] for i in order], max_new_tokens, batch_size, stop_loops, sampling, seeds)
    with out.open("a", encoding="utf-8") as f:
        for i, answer in zip(order, answers, strict=True):
            generated += len(answer)
            text = tokenizer.decode(_drop_bos(tokenizer, encoded[i]) + answer, skip_special_tokens=False)
            f.write(json.dumps({"id": todo[i].id, "text": text}) + "\n")
            f.flush()  # a row on disk is a prompt a rerun skips
            written += 1
            bar.update(1)
            bar.set_postfix(tok_s=f"{generated / max(bar.format_dict['elapsed'], 1e-9):.0f}")
    seconds = max(bar.format_dict["elapsed"], 1e-9)
    bar.close()
    log(
        f"mtpspec: wrote {written} rows ({generated} generated tokens, {generated / seconds:.1f} tok/s) to {out}; "
        f"train with --data {out},…"
    )
    return written


def sample_seed(seed: int, row_id: str) -> int:
    """A drawn answer's seed: from `--seed` and the row's id, stable across runs and batches."""
    return zlib.crc32(f"{seed}/{row_id}".encode())


def _drop_bos(tokenizer, ids: list[int]) -> list[int]:
    """Training documents get the tokenizer's BOS back when they are packed."""
    return ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids
