"""`python -m rallypoint.specs`: rebuild the saved ASTs shipped next to the built-in specs (a development step).

Run it after changing a spec here or anything in rallypoint.grammar; a test fails until the saved ASTs are
current again. Until then they are only ignored (the specs are parsed), never wrong.
"""

from importlib import resources

from rallypoint.engine._sessions import (
    _SPECS_PACKAGE,
    _builtin_origin,
    _read_builtin,
    _saved_ast_name,
    builtin_spec_names,
)
from rallypoint.grammar._saved import save_spec_ast


def main() -> None:
    for name in builtin_spec_names():
        text = _read_builtin(name)
        assert text is not None, name
        with resources.as_file(resources.files(_SPECS_PACKAGE).joinpath(_saved_ast_name(name))) as target:
            target.write_bytes(save_spec_ast(text, _builtin_origin(name)))
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
