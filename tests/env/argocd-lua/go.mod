module gputrainer.dev/tests/argocd-lua

go 1.26

// The versions argoproj/argo-cd's go.mod requires (master at 37ee0097cf, December 2026):
// the Lua VM Argo CD embeds, and the JSON encoder it reads a health script's result with.
require (
	github.com/yuin/gopher-lua v1.1.2
	layeh.com/gopher-json v0.0.0-20190114024228-97fed8db8427
)
