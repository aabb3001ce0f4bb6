"""The structured-output corpus: JSON Schemas of different shapes and texts to extract from,
shared by the extract integration test, the grammar unit tests and bench_structured."""

from __future__ import annotations

from typing import Any

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}
CONTACT = {  # flat, formats and a pattern
    "type": "object",
    "properties": {
        "email": {"type": "string", "format": "email"},
        "phone": {"type": "string", "pattern": "^\\+?[0-9 ]{6,20}$"},
        "city": {"type": "string"},
    },
    "required": ["email", "city"],
}
ORDER = {  # nested object, array of objects
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
            "required": ["name"],
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 5,
            "items": {
                "type": "object",
                "properties": {
                    "product": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                },
                "required": ["product", "quantity"],
            },
        },
    },
    "required": ["customer", "items"],
}
SENTIMENT = {  # enums and a bounded number
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["sentiment", "score"],
}
EVENT = {  # date format, optional fields
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "date": {"type": "string", "format": "date"},
        "location": {"type": "string"},
        "online": {"type": "boolean"},
    },
    "required": ["title", "date"],
}
TAGS = {  # array of strings with bounds
    "type": "object",
    "properties": {
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 30},
            "minItems": 1,
            "maxItems": 6,
        }
    },
    "required": ["tags"],
}
PRODUCT = {  # numbers with exclusive bounds, const, nullable
    "type": "object",
    "properties": {
        "kind": {"const": "product"},
        "name": {"type": "string"},
        "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "discount": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
    },
    "required": ["kind", "name", "price", "currency"],
}
ADDRESS_BOOK = {  # $defs / $ref, nested twice
    "$defs": {
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{4,6}$"},
            },
            "required": ["city"],
        }
    },
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "home": {"$ref": "#/$defs/address"},
        "work": {"$ref": "#/$defs/address"},
    },
    "required": ["name", "home"],
}
MEETING = {  # anyOf, integers with bounds, array of objects
    "type": "object",
    "properties": {
        "topic": {"type": "string"},
        "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480},
        "participants": {
            "type": "array",
            "maxItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "role": {"enum": ["host", "guest", "speaker"]},
                },
                "required": ["name", "role"],
            },
        },
        "recurring": {"anyOf": [{"type": "boolean"}, {"enum": ["weekly", "monthly"]}]},
    },
    "required": ["topic", "duration_minutes", "participants"],
}
REVIEW = {  # integer rating 1-5, optional nested pros/cons
    "type": "object",
    "properties": {
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 120},
        "details": {
            "type": "object",
            "properties": {
                "pros": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                "cons": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            },
        },
    },
    "required": ["rating", "summary"],
}
FLIGHT = {  # date-time, uuid-free strings with patterns, multipleOf
    "type": "object",
    "properties": {
        "flight": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,4}$"},
        "departure": {"type": "string", "format": "date-time"},
        "seats": {"type": "integer", "minimum": 1, "maximum": 9},
        "fare_class": {"enum": ["economy", "business", "first"]},
        "price": {"type": "number", "minimum": 0, "multipleOf": 0.01},
    },
    "required": ["flight", "seats", "fare_class"],
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": PERSON,
    "contact": CONTACT,
    "order": ORDER,
    "sentiment": SENTIMENT,
    "event": EVENT,
    "tags": TAGS,
    "product": PRODUCT,
    "address_book": ADDRESS_BOOK,
    "meeting": MEETING,
    "review": REVIEW,
    "flight": FLIGHT,
}

TEXTS: dict[str, list[str]] = {
    "person": [
        "Maria Lopez is a 34-year-old architect living in Madrid.",
        "Our new intern, Tom, just turned nineteen.",
    ],
    "contact": [
        "Reach Jane at jane.doe@example.com or +44 20 7946 0958; she works from Leeds.",
        "Contact: support@acme.io, office in Berlin.",
    ],
    "order": [
        "Order from Kenji Sato (Japan): 2 mechanical keyboards and 1 USB hub.",
        "Please send three boxes of green tea and one teapot to Anna Berg in Sweden.",
    ],
    "sentiment": [
        "I absolutely loved the concert, the band was fantastic!",
        "The delivery was late and the box was damaged. Very disappointing.",
    ],
    "event": [
        "PyCon Italia takes place in Florence on 2025-05-28; tickets are on sale.",
        "Join our online webinar 'Kafka in practice' on 2024-11-05.",
    ],
    "tags": [
        "A beginner's guide to baking sourdough bread at home with rye flour.",
        "Benchmarking PostgreSQL and DuckDB for analytical queries on laptops.",
    ],
    "product": [
        "The Aurora desk lamp costs 49.90 EUR, now with a 10% discount.",
        "Noise-cancelling headphones, model QX2, priced at 199 USD.",
    ],
    "address_book": [
        "Peter Novak lives at 12 Elm Street, Springfield 12345 and works at 1 Main Square, "
        "Shelbyville 67890.",
        "Lena Fischer's home address is Gartenweg 3, 80331 Munich.",
    ],
    "meeting": [
        "Weekly 45-minute sync about the Q3 roadmap, hosted by Sara with guests Ben and Li.",
        "A one-off 2-hour design review; Omar presents, Julia hosts.",
    ],
    "review": [
        "Great battery life and a sharp screen, but the speakers are weak. 4 out of 5.",
        "Terrible. Broke after two days. One star.",
    ],
    "flight": [
        "Booked LH1234 departing 2025-03-14T08:30:00Z, 2 seats in business for 840.50.",
        "Flight BA217 leaves on 2024-12-01T19:05:00Z; one economy seat.",
    ],
}
