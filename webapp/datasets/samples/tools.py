"""Sample data for instruction tuning: tool selection.

A catalog of 12 tools; each row is a user's request and the assistant's one call, in OpenAI's
chat shape (`messages` with `tool_calls`, and the row's `tools`). Which tool follows from the
request's wording and its arguments are copied out of it (a city, a date, an amount), so an
instruction model learns both in a short LoRA run; the held-out metrics are the share of calls
to the right tool and with JSON-equal arguments, base against tuned. A few rows go on after the
call: the tool's result comes back and the assistant answers from it (the loss is on the call
and the answer, never on the result). Deterministic, pure Python.
"""

from __future__ import annotations

import json
import random


def _tool(name: str, description: str, **parameters: str) -> dict:
    return {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {key: {"type": kind} for key, kind in parameters.items()},
        "required": list(parameters)}}


TOOLS = [
    _tool("get_weather", "Current weather in a city", city="string"),
    _tool("get_forecast", "Weather forecast for a city on a date", city="string", date="string"),
    _tool("convert_currency", "Convert an amount between currencies", amount="number", source="string", target="string"),
    _tool("search_flights", "Find flights between two cities on a date", origin="string", destination="string", date="string"),
    _tool("book_table", "Reserve a restaurant table", restaurant="string", people="integer", time="string"),
    _tool("send_email", "Send an email", to="string", subject="string"),
    _tool("create_reminder", "Set a reminder", text="string", time="string"),
    _tool("get_stock_price", "Latest price of a stock ticker", ticker="string"),
    _tool("translate_text", "Translate text into a language", text="string", language="string"),
    _tool("define_word", "Dictionary definition of a word", word="string"),
    _tool("calculate", "Evaluate an arithmetic expression", expression="string"),
    _tool("play_music", "Play songs by an artist", artist="string"),
]

CITIES = ["Paris", "Lisbon", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Seoul", "Denver", "Perth", "Quito", "Riga"]
DATES = ["2026-03-14", "2026-05-02", "2026-07-21", "2026-09-09", "2026-11-30", "2027-01-15"]
CURRENCIES = ["EUR", "USD", "JPY", "GBP", "CHF", "CAD"]
TICKERS = ["AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "SAP"]
WORDS = ["ephemeral", "lucid", "candid", "serene", "brisk", "frugal"]
ARTISTS = ["Miles Davis", "Nina Simone", "Fela Kuti", "Bjork", "Caetano Veloso", "Sade"]
LANGUAGES = ["French", "Spanish", "German", "Japanese", "Italian", "Swahili"]
PEOPLE = ["ana@example.com", "li@example.com", "omar@example.com", "kim@example.com"]


def _requests(rng: random.Random) -> list[tuple[str, str, dict]]:
    """(the user's request, the tool it calls, the call's arguments) for each tool, a few ways each."""
    city, other, date = rng.choice(CITIES), rng.choice(CITIES), rng.choice(DATES)
    amount, source, target = rng.choice([20, 75, 120, 300, 1500]), *rng.sample(CURRENCIES, 2)
    word, ticker, artist, language = rng.choice(WORDS), rng.choice(TICKERS), rng.choice(ARTISTS), rng.choice(LANGUAGES)
    people, hour = rng.choice([2, 3, 4, 6]), rng.choice(["18:30", "19:00", "20:15", "12:45"])
    a, b = rng.randrange(2, 99), rng.randrange(2, 99)
    return [
        (f"What's the weather like in {city} right now?", "get_weather", {"city": city}),
        (f"Will it rain in {city} on {date}?", "get_forecast", {"city": city, "date": date}),
        (f"How much is {amount} {source} in {target}?", "convert_currency", {"amount": amount, "source": source, "target": target}),
        (f"Find me a flight from {city} to {other} on {date}.", "search_flights", {"origin": city, "destination": other, "date": date}),
        (f"Book a table for {people} at Chez Lou at {hour}.", "book_table", {"restaurant": "Chez Lou", "people": people, "time": hour}),
        (f"Email {rng.choice(PEOPLE)} with the subject 'Quarterly report'.", "send_email", None),
        (f"Remind me to call the bank at {hour}.", "create_reminder", {"text": "call the bank", "time": hour}),
        (f"What is {ticker} trading at?", "get_stock_price", {"ticker": ticker}),
        (f"Translate 'good morning' into {language}.", "translate_text", {"text": "good morning", "language": language}),
        (f"What does '{word}' mean?", "define_word", {"word": word}),
        (f"What is {a} * {b}?", "calculate", {"expression": f"{a} * {b}"}),
        (f"Put on some {artist}.", "play_music", {"artist": artist}),
    ]


RESULTS = {
    "get_weather": ({"temperature_c": 18, "sky": "cloudy"}, "It is 18 °C and cloudy in {city}."),
    "get_stock_price": ({"price": 187.4, "currency": "USD"}, "{ticker} is at 187.40 USD."),
}


def rows(count: int = 168, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < count:
        for request, name, arguments in _requests(rng):
            if request in seen:  # each request once: a repeated one would only be memorised
                continue
            seen.add(request)
            if arguments is None:  # the address is in the request
                arguments = {"to": request.split()[1], "subject": "Quarterly report"}
            call = {"role": "assistant", "content": "", "tool_calls": [{"id": f"call_{len(out)}", "type": "function",
                     "function": {"name": name, "arguments": json.dumps(arguments)}}]}
            messages = [{"role": "user", "content": request}, call]
            if name in RESULTS and len(out) % 3 == 0:
                result, answer = RESULTS[name]
                messages += [{"role": "tool", "tool_call_id": f"call_{len(out)}", "content": json.dumps(result)},
                             {"role": "assistant", "content": answer.format(**arguments)}]
            out.append({"messages": messages, "tools": [{"type": "function", "function": tool} for tool in TOOLS]})
    return out[:count]
