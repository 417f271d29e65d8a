"""Pure logic of one-time codes: no clock, no socket, no database. ``now`` is passed in."""
