"""Each chapter's parameters: schema, profiles, validation; a notebook's parameters cell read as the report reads it."""
