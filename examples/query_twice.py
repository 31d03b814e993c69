# SPDX-License-Identifier: Apache-2.0
"""Query a vLLM server twice with the same long context and print the cold and warm TTFT.

Start the server first (``examples/online_serve.sh``), then:

    python examples/query_twice.py                                 # a generated 8,000-word context
    python examples/query_twice.py --context-file man-bash.txt     # your own long document
"""

from __future__ import annotations

import argparse
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--model", default=None, help="served model name (default: the server's first model)")
    parser.add_argument("--context-file", default=None, help="a long text file to use as the context")
    parser.add_argument("--context-words", type=int, default=8000,
                        help="without --context-file: length of the generated context in words")
    parser.add_argument("--max-chars", type=int, default=70000, help="truncate the context to this many characters")
    parser.add_argument("--question", default="Summarize the text above in two sentences.")
    parser.add_argument("--max-tokens", type=int, default=32)
    return parser.parse_args(argv)


def build_prompt(args: argparse.Namespace) -> str:
    if args.context_file:
        with open(args.context_file, encoding="utf-8") as f:
            context = f.read()
    else:  # numbers are single words for every tokenizer's pre-tokenizer
        context = " ".join(str(i % 10000) for i in range(args.context_words))
    return f"{context[: args.max_chars]}\n\n{args.question}"


# [start-query]
def query_and_measure_ttft(client, model: str, prompt: str, max_tokens: int) -> float:
    """Stream one completion; return the seconds until its first token arrived."""
    start = time.perf_counter()
    ttft = None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, stream=True)
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - start
    return ttft if ttft is not None else time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    from openai import OpenAI

    client = OpenAI(api_key="dummy-key", base_url=args.base_url)  # any key works for a local server
    model = args.model or client.models.list().data[0].id
    prompt = build_prompt(args)

    cold = query_and_measure_ttft(client, model, prompt, args.max_tokens)
    print(f"Cold TTFT: {cold:.3f} seconds")
    warm = query_and_measure_ttft(client, model, prompt, args.max_tokens)
    print(f"Warm TTFT: {warm:.3f} seconds")
    print(f"TTFT improvement: {cold - warm:.3f} seconds ({cold / warm:.1f}x faster)")
# [end-query]


if __name__ == "__main__":
    main()
