"""Generated code, do not edit: regenerate with `just proto`."""
