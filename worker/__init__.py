"""The one-time-code command worker. ``python -m worker`` runs it."""
