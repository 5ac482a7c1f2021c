"""Standard prompt texts of the evaluation benchmarks.

The formats follow the LLaVA-1.5 / lmms-eval conventions that the published small-VLM numbers use:

* short-answer benchmarks (VQAv2, POPE, MME): ``"{question}\\nAnswer the question using a single word or phrase."``
  (MME drops its questions' own " Please answer yes or no." first, as lmms-eval does)
* lettered multiple choice (AI2D, ScienceQA-IMG, MMBench, MMMU): options written ``"A. option"`` one per line, then
  ``"Answer with the option's letter from the given choices directly."``
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."

_MMMU_IMAGE_TAG = re.compile(r"<image (\d+)>")


def option_letters(n: int) -> list:
    """``["A", "B", ...]`` for ``n`` options."""
    if n > 26:
        raise ValueError(f"too many options ({n}) to letter")
    return [chr(ord("A") + i) for i in range(n)]


def format_options(options: Sequence[str]) -> str:
    """``"A. first\\nB. second"``."""
    return "\n".join(f"{letter}. {opt}" for letter, opt in zip(option_letters(len(options)), options))


def short_answer_prompt(question: str) -> str:
    """VQAv2 / POPE / MME: question + short-answer instruction."""
    return f"{question.strip()}\n{SHORT_ANSWER_INSTRUCTION}"


MME_YES_NO_SUFFIX = " Please answer yes or no."


def mme_prompt(question: str) -> str:
    """MME as in lmms-eval: the question's own " Please answer yes or no." is replaced by the short-answer line."""
    return short_answer_prompt(question.strip().replace(MME_YES_NO_SUFFIX, ""))


def multiple_choice_prompt(question: str, options: Sequence[str], context: Optional[str] = None,
                           context_prefix: str = "") -> str:
    """Lettered multiple choice: ``[context\\n]question\\nA. ..\\nB. ..\\n<letter instruction>``."""
    head = ""
    if context is not None and str(context).strip():
        head = f"{context_prefix}{str(context).strip()}\n"
    return f"{head}{question.strip()}\n{format_options(options)}\n{LETTER_INSTRUCTION}"


def ai2d_prompt(question: str, options: Sequence[str]) -> str:
    return multiple_choice_prompt(question, options)


def scienceqa_prompt(question: str, choices: Sequence[str], hint: Optional[str] = None) -> str:
    """ScienceQA (LLaVA / lmms-eval): ``Context: {hint}`` line first when the hint is not empty."""
    return multiple_choice_prompt(question, choices, context=hint, context_prefix="Context: ")


def mmbench_prompt(question: str, options: Sequence[str], hint: Optional[str] = None) -> str:
    """MMBench (LLaVA): ``{hint}\\n{question}\\nA. ..`` + letter instruction."""
    return multiple_choice_prompt(question, options, context=hint)


def strip_mmmu_image_tags(text: str) -> str:
    """Remove ``<image N>`` placeholders from MMMU text (the image itself goes in through the image slot)."""
    return _MMMU_IMAGE_TAG.sub("", text)


def mmmu_image_refs(text: str) -> list:
    """Sorted distinct image numbers referenced by ``<image N>`` tags in ``text``."""
    return sorted({int(m) for m in _MMMU_IMAGE_TAG.findall(text)})


def mmmu_prompt(question: str, options: Sequence[str], question_type: str) -> str:
    """MMMU as in lmms-eval: multiple choice ``question\\nA. ..\\n\\n<letter instruction>``; open
    ``question\\n\\n<short-answer instruction>``. ``<image N>`` tags are stripped."""
    q = strip_mmmu_image_tags(question).strip()
    if question_type == "multiple-choice":
        opts = [strip_mmmu_image_tags(str(o)).strip() for o in options]
        return f"{q}\n{format_options(opts)}\n\n{LETTER_INSTRUCTION}"
    return f"{q}\n\n{SHORT_ANSWER_INSTRUCTION}"


def strip_image_token(text: str, token: str = "<image>") -> str:
    """Drop the LLaVA ``<image>`` placeholder (and the newline next to it) from a conversation turn."""
    text = text.replace(token + "\n", "").replace("\n" + token, "").replace(token, "")
    return text.strip()
