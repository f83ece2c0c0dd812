"""Teacher-output stores: built once per (teacher, view recipe, tap), read by every distill job."""
