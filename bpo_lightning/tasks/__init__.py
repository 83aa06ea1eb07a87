"""Built-in tasks: prompts, reference answers, gold rewards and starting policies that ship with the package."""
