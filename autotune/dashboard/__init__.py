"""`autotune dashboard`: read-only pages and a JSON API over the store (see `app.py`)."""
