"""The recipes shipped with the toolkit, as package data: `gqa-uptrain --list`, `gqa-uptrain --copy NAME`."""
