"""Sample data for text classification: which tool an assistant should call for a request.

Requests to a personal assistant, each labelled with the one tool that serves it: weather,
calendar, email or search. Each tool has a dozen phrasings with slots (places, days, people,
topics) filled from shared lists, so that a place or a day alone does not give the answer
away ("Will it rain in Lisbon on Friday?" is weather, "Book a table in Lisbon on Friday" is
calendar): a classifier has to read what is asked. Deterministic; pure Python.
"""

from __future__ import annotations

import itertools
import random

PLACES = ["Lisbon", "Oslo", "Nairobi", "Kyoto", "Denver", "Lyon", "Austin", "Hanoi", "Porto", "Cork"]
DAYS = ["today", "tomorrow", "on Friday", "this weekend", "next Monday", "on Thursday morning", "tonight"]
PEOPLE = ["Priya", "Marco", "my manager", "the landlord", "Aunt Rosa", "the design team", "Dr. Okafor"]
TOPICS = [
    "the quarterly report", "the dentist appointment", "the team offsite", "the invoice", "the new lease",
    "the product launch", "the school trip", "the book club",
]  # fmt: skip
SUBJECTS = [
    "cheap flights", "a vegan lasagna recipe", "the population of Canada", "how tides work",
    "the best hiking boots", "who invented the telephone", "train times", "a good Italian restaurant",
]  # fmt: skip

TEMPLATES = {
    "weather": [
        "Will it rain in {place} {day}?",
        "What's the weather like in {place} {day}?",
        "Do I need an umbrella {day}?",
        "How cold will it be in {place} {day}?",
        "Is it going to snow {day}?",
        "What's the forecast for {place} {day}?",
        "Should I wear a jacket {day} in {place}?",
        "Any storms expected in {place} {day}?",
        "How windy is it in {place} right now?",
        "Will it be sunny enough for the beach {day}?",
        "What temperature is it outside in {place}?",
        "Tell me if it'll be humid in {place} {day}.",
    ],
    "calendar": [
        "Book a meeting with {person} {day}.",
        "Am I free {day}?",
        "Move {topic}, I can't make it {day}.",
        "What's on my schedule {day}?",
        "Remind me about {topic} {day}.",
        "Cancel my call with {person} {day}.",
        "Set up lunch with {person} in {place} {day}.",
        "When is {topic}?",
        "Block two hours {day} for {topic}.",
        "Put {topic} in my calendar {day}.",
        "Reschedule {topic} with {person}.",
        "Do I have anything planned in {place} {day}?",
    ],
    "email": [
        "Email {person} about {topic}.",
        "Did {person} reply to my message about {topic}?",
        "Send {person} a note saying I'll be late {day}.",
        "Read me the unread emails from {person}.",
        "Forward the message about {topic} to {person}.",
        "Draft a reply to {person} thanking them for {topic}.",
        "Write to {person} that {topic} is done.",
        "Check my inbox for anything from {person}.",
        "Reply to {person}: see you in {place} {day}.",
        "Mark the email about {topic} as important.",
        "Send the file on {topic} to {person}.",
        "Any new mail about {topic}?",
    ],
    "search": [
        "Search the web for {subject}.",
        "Look up {subject}.",
        "Find {subject} in {place}.",
        "Who can tell me about {subject}? Search for it.",
        "Google {subject} for me.",
        "I need information on {subject}.",
        "What does the internet say about {subject}?",
        "Find articles about {subject}.",
        "Search for {subject} near {place}.",
        "Can you look up {subject} {day}?",
        "Find me a page explaining {subject}.",
        "Show me results for {subject}.",
    ],
}

ROWS_PER_LABEL = 75


def rows() -> list[dict[str, str]]:
    """300 distinct requests, 75 per tool, in a fixed shuffled order."""
    rng = random.Random(0)
    out = []
    for label, templates in TEMPLATES.items():
        texts: list[str] = []
        for attempt in itertools.count():
            if len(texts) == ROWS_PER_LABEL:
                break
            template = templates[attempt % len(templates)]
            text = template.format(
                place=rng.choice(PLACES),
                day=rng.choice(DAYS),
                person=rng.choice(PEOPLE),
                topic=rng.choice(TOPICS),
                subject=rng.choice(SUBJECTS),
            )
            if text not in texts:  # a duplicate would let held-out rows repeat training rows
                texts.append(text)
        out += [{"text": text, "label": label} for text in texts]
    rng.shuffle(out)
    return out
