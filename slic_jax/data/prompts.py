"""The TL;DR prompt format of the original work, and fitting it to a budget.

``format_prompt`` builds::

    SUBREDDIT: r/{subreddit}

    TITLE: {title}

    POST: {post}

    TL;DR:

When the prompt is too long the post is cut back at its last newline (trailing
whitespace stripped) until the prompt fits, as in Stiennon et al. (2020). A
post with no newline left is returned as is: the tokenizer trim of the input
pipeline then truncates the token sequence (keeping its first tokens).
"""

from __future__ import annotations

from typing import Callable

__all__ = [
    "PROMPT_TEMPLATE",
    "POST_MARKER",
    "TLDR_MARKER",
    "format_prompt",
    "fit_prompt",
    "fit_formatted_prompt",
]

PROMPT_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
POST_MARKER = "POST:"
TLDR_MARKER = "\n\nTL;DR:"

CountTokens = Callable[[str], int]


def format_prompt(*, subreddit: str, title: str, post: str) -> str:
  """The original work's prompt for one Reddit post."""
  return PROMPT_TEMPLATE.format(subreddit=subreddit, title=title, post=post)


def _cut_last_newline(post: str) -> str:
  return post[: post.rindex("\n")].rstrip()


def fit_prompt(
    *,
    subreddit: str,
    title: str,
    post: str,
    max_tokens: int,
    count_tokens: CountTokens,
) -> str:
  """format_prompt(...), with the post cut at newlines until it fits.

  While ``count_tokens(prompt) > max_tokens`` and the post still has a
  newline, the post is cut back at its LAST newline and trailing whitespace is
  stripped. If no newline is left the (still too long) prompt is returned as
  is; the tokenizer trim truncates it. `count_tokens` should count every token
  the model sees, EOS included.
  """
  prompt = format_prompt(subreddit=subreddit, title=title, post=post)
  while count_tokens(prompt) > max_tokens and "\n" in post:
    post = _cut_last_newline(post)
    prompt = format_prompt(subreddit=subreddit, title=title, post=post)
  return prompt


def fit_formatted_prompt(
    *, prompt: str, max_tokens: int, count_tokens: CountTokens
) -> str:
  """fit_prompt for an already formatted (mirror) prompt.

  The post is the text between the first ``"POST:"`` and the last
  ``"\\n\\nTL;DR:"``; it is cut back at its last newline while the prompt is
  too long. A prompt without such a section is returned unchanged.
  """
  start = prompt.find(POST_MARKER)
  end = prompt.rfind(TLDR_MARKER)
  if start < 0 or end < 0 or end < start + len(POST_MARKER):
    return prompt
  start += len(POST_MARKER)
  head, post, tail = prompt[:start], prompt[start:end], prompt[end:]
  out = prompt
  while count_tokens(out) > max_tokens and "\n" in post:
    post = _cut_last_newline(post)
    out = head + post + tail
  return out
