-- The keyed fingerprint (HMAC-SHA256 under OTP_SECRET_KEY) of the command each reply answered:
-- a command_id reused for a different command is refused instead of replayed. NULL on rows
-- stored before this migration, which are replayed as before.
ALTER TABLE replies ADD COLUMN fingerprint BLOB;
