"""Language names of corpus documents: by file extension, and which of them are prose.

A document's language decides which quality rules it meets (code rules or Gopher/FineWeb text rules, see
data/filters.py) and whether it may be FIM-transformed (`data.fim.languages`, checked against `LANGUAGES` when the
config is composed, so a typo fails at once instead of silently switching FIM off).
"""

from __future__ import annotations

from pathlib import PurePath

# Language of a file by extension. Sources with a language column (the-stack's "lang") may name others.
EXTENSION_LANG = {
    ".py": "python",
    ".pyi": "python",
    ".md": "markdown",
    ".rst": "rst",
    ".txt": "text",
    ".json": "json",
    ".js": "javascript",
    ".ts": "typescript",
    ".c": "c",
    ".h": "c",
    ".cpp": "cpp",
    ".cc": "cpp",
    ".hpp": "cpp",
    ".java": "java",
    ".go": "go",
    ".rs": "rust",
    ".sol": "solidity",
    ".sh": "shell",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".toml": "toml",
    ".html": "html",
    ".rb": "ruby",
    ".php": "php",
    ".cs": "c-sharp",
    ".kt": "kotlin",
    ".scala": "scala",
    ".swift": "swift",
    ".lua": "lua",
    ".r": "r",
    ".jl": "julia",
    ".sql": "sql",
    ".css": "css",
}
PROSE_LANGS = frozenset({"markdown", "rst", "text"})
# every language name a config may list in data.fim.languages ("*" = every language that is not prose)
LANGUAGES = frozenset(EXTENSION_LANG.values())


def normalize_lang(lang: object, path: object, default: str) -> str:
    """Lower-cased language name from an explicit field, else from the path's extension, else `default`."""
    if lang:
        return str(lang).strip().lower().replace(" ", "-")
    if path:
        return EXTENSION_LANG.get(PurePath(str(path)).suffix.lower(), default)
    return default
