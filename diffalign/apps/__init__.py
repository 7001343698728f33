"""The user-facing commands, composing every layer below: `score`, `generate`, `pairs`, `demo` (with its method
`sections`, the toy `evaluate`-ion and the HTML `report`)."""
