"""Which prompt each generated image had: from ``--prompts FILE`` (one line per image, in natural name order) or from
the ``prompt`` PNG text chunk that ``ultragen generate`` writes (see ``ultragen.pipeline.outputs.png_text``). A prompts
file is read by ``ultragen generate --prompts-file``'s rule (blank and ``#`` lines skipped), so one file serves both."""

from __future__ import annotations

from pathlib import Path

from ultragen.eval.images import ImageRecord


def read_prompt_file(path: Path) -> list[str]:
    """The non-blank, non-``#`` lines of a UTF-8 text file, stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--prompts {str(path)!r} could not be read as UTF-8 text ({error})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def resolve_prompts(records: list[ImageRecord], prompt_file: Path | None) -> list[str]:
    """One prompt per image. With a file: it must have one line per image, and an image that carries its own prompt
    must carry the same one (else the file is in another order). Without: every image must carry one."""
    if prompt_file is None:
        missing = [r.path.name for r in records if not r.embedded_prompt]
        if missing:
            raise ValueError(f"{len(missing)} of {len(records)} images have no prompt in their PNG metadata "
                             f"(first: {missing[0]!r}); pass --prompts FILE (one line per image, natural name "
                             f"order) or leave clip out of --metrics")
        return [r.embedded_prompt for r in records]
    lines = read_prompt_file(prompt_file)
    if len(lines) != len(records):
        raise ValueError(f"--prompts {str(prompt_file)!r} has {len(lines)} prompts but --images holds "
                         f"{len(records)} images; give one line per image, in natural name order")
    for i, (record, line) in enumerate(zip(records, lines)):
        if record.embedded_prompt and record.embedded_prompt.strip() != line:
            raise ValueError(f"line {i + 1} of --prompts ({line[:60]!r}) does not match the prompt stored in "
                             f"{record.path.name!r} ({record.embedded_prompt[:60]!r}); the file must list "
                             f"prompts in natural name order, or drop --prompts to use the stored ones")
    return lines
