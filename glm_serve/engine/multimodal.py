"""GLM-4V in the engine: a prompt's image placeholder widened to the tower's slots, the preprocessed image,
and, per step, the tower's vectors for the image slots that the step's chunks cover."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ImageNotSupportedError(ValueError):
    """An image was sent to a text-only model."""


@dataclass
class MultiModalPrompt:
    """A prompt after GLM-4V expansion: token ids with one slot per image embedding, and the image."""

    ids: list[int]  # [num_slots] token ids; image slots hold the placeholder id
    pixels: torch.Tensor | None = None  # [3, S, S] uint8 RGB (from bytes; normalized by the tower) or normalized
    hash: int | None = None  # content hash mixed into prefix-cache keys
    span: tuple[int, int] | None = None  # [start, end) slots of boi, the image vectors and eoi
    embeds: torch.Tensor | None = None  # [end - start, hidden] the tower's output, computed once


def prepare_image(vision_config, special_ids: dict[str, int], prompt_ids: list[int],
                  image: bytes | torch.Tensor | None) -> MultiModalPrompt:
    """vision_config: the tower's VisionConfig (None: a text-only model). ValueError for an image sent to a
    text-only model, or a placeholder/image mismatch."""
    if vision_config is None:
        if image is not None:
            raise ImageNotSupportedError("this model is text-only: it takes no images")
        return MultiModalPrompt(list(prompt_ids))
    from glm_serve.image import image_hash, load_pixels  # noqa: PLC0415 (GLM-4V only)
    from glm_serve.vision_config import expand_image_tokens  # noqa: PLC0415

    sp = special_ids
    expanded = expand_image_tokens(prompt_ids, sp["<|begin_of_image|>"], sp["<|end_of_image|>"],
                                   vision_config.num_image_vectors, image_id=sp["<|endoftext|>"])
    if (expanded.image_span is None) != (image is None):
        raise ValueError("the prompt's image placeholder and the image must come together" if image is None
                         else "an image was given but the prompt has no image placeholder")
    if image is None:
        return MultiModalPrompt(expanded.ids)
    size = vision_config.image_size
    pixels = load_pixels(image, size) if isinstance(image, (bytes, bytearray)) else image
    if tuple(pixels.shape) != (3, size, size):
        raise ValueError(f"image pixels must be [3, {size}, {size}], got {list(pixels.shape)}")
    return MultiModalPrompt(expanded.ids, pixels, image_hash(pixels), expanded.image_span)


def image_embeddings(out, vision, mm_of) -> list[tuple[int, torch.Tensor]] | None:
    """(flat row, vectors) for every image slot in this step's chunks. The tower runs once per request, when
    its first chunk reaches the image, and its output is kept until the request ends (a preempted request
    recomputes its prefill, image included). mm_of(seq) -> the request's MultiModalPrompt."""
    from glm_serve.vision_config import span_in_chunk  # noqa: PLC0415

    mm, row = None, 0
    for s in out.scheduled:
        span = s.seq.mm_span
        if span is not None:
            hit = span_in_chunk(span, s.start, s.start + s.num_new_tokens)
            if hit is not None:
                prompt = mm_of(s.seq)
                if prompt.embeds is None:
                    prompt.embeds = vision(prompt.pixels[None])[0]  # [n + 2, hidden]
                mm = mm or []
                mm.append((row + hit[1].start, prompt.embeds[hit[0]]))
        row += s.num_new_tokens
    return mm
