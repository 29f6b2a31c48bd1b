// argocd-lua runs Argo CD resource health scripts the way Argo CD runs them: in gopher-lua (the
// version Argo CD's go.mod pins), with the libraries Argo CD opens, the object handed over as the
// global `obj`, and the returned table turned into a health status by Argo CD's rules. It is a
// test tool of gpu-trainer (tests/argocd_health.rs); see config/argocd/README.md.
//
// What it models, from argoproj/argo-cd:
//   - util/lua/lua.go, runLuaWithResourceActionParameters: lua.NewState with SkipOpenLibs unless
//     the override sets useOpenLibs (argocd-cm `resource.customizations.useOpenLibs.<group_kind>`,
//     false by default); then the package, base and table libraries and a "safe" os module with
//     only os.time and os.date (util/lua/oslib_safe.go), also preloaded for require("os"); a
//     1 second context deadline; `obj` set as a global from the unstructured object.
//   - ExecuteHealthLua: the value on top of the stack after the call is the result. A table is
//     encoded with layeh.com/gopher-json and decoded into {status, message}; a type mismatch
//     (including an empty table, which encodes as []) gives an empty status; a status outside
//     Argo CD's six gives Unknown "Lua returned an invalid health status"; nil gives an empty
//     status; anything else is an error.
//   - gitops-engine/pkg/health/health.go, GetResourceHealth: an object with a deletionTimestamp
//     (and no hook finalizer) is "Progressing: Pending deletion" before any script runs; a script
//     error is shown as Unknown with the error text.
//
// Input on stdin: a JSON list of cases {"name", "script" (path of a health.lua), "object" (the
// resource as JSON), "useOpenLibs" (optional)}. Output on stdout: a JSON list, one entry per case
// and in the same order: {"name", "result" ({status, message} the script gave, as Argo CD reads
// it) or "error" (why Argo CD would fail the script), and "shown" (the health Argo CD shows)}.
// `argocd-lua --version` prints the gopher-lua and gopher-json versions it was built with.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"time"

	lua "github.com/yuin/gopher-lua"
	luajson "layeh.com/gopher-json"
)

// scriptTimeout is the deadline Argo CD gives every script run.
const scriptTimeout = 1 * time.Second

// hookFinalizer keeps Argo CD judging a deleted object by its script (gitops-engine's sync/hook).
const hookFinalizer = "argocd.argoproj.io/hook-finalizer"

var healthStatuses = []string{"Unknown", "Progressing", "Healthy", "Suspended", "Degraded", "Missing"}

type request struct {
	Name        string          `json:"name"`
	Script      string          `json:"script"`
	Object      json.RawMessage `json:"object"`
	UseOpenLibs bool            `json:"useOpenLibs"`
}

// healthStatus has the shape (and JSON tags) of gitops-engine's health.HealthStatus.
type healthStatus struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
}

type response struct {
	Name   string        `json:"name"`
	Result *healthStatus `json:"result,omitempty"`
	Error  string        `json:"error,omitempty"`
	Shown  healthStatus  `json:"shown"`
}

func main() {
	if len(os.Args) == 2 && os.Args[1] == "--version" {
		printVersions()
		return
	}
	if len(os.Args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: argocd-lua < cases.json  (or argocd-lua --version)")
		os.Exit(2)
	}
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "argocd-lua:", err)
		os.Exit(1)
	}
}

func printVersions() {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		fmt.Println("no build information")
		return
	}
	for _, dep := range info.Deps {
		fmt.Println(dep.Path, dep.Version)
	}
}

func run(in io.Reader, out io.Writer) error {
	var requests []request
	if err := json.NewDecoder(in).Decode(&requests); err != nil {
		return fmt.Errorf("reading the cases from stdin: %w", err)
	}
	safeOs, err := safeOsFuncs()
	if err != nil {
		return err
	}
	scripts := map[string]string{}
	responses := make([]response, 0, len(requests))
	for _, req := range requests {
		script, ok := scripts[req.Script]
		if !ok {
			data, err := os.ReadFile(req.Script)
			if err != nil {
				return fmt.Errorf("%s: %w", req.Name, err)
			}
			script = string(data)
			scripts[req.Script] = script
		}
		object, err := decodeObject(req.Object)
		if err != nil {
			return fmt.Errorf("%s: the object: %w", req.Name, err)
		}
		resp := response{Name: req.Name}
		result, err := executeHealthLua(object, script, req.UseOpenLibs, safeOs)
		if err != nil {
			resp.Error = err.Error()
		} else {
			resp.Result = result
		}
		resp.Shown = shownHealth(object, result, err)
		responses = append(responses, resp)
	}
	enc := json.NewEncoder(out)
	enc.SetIndent("", " ")
	enc.SetEscapeHTML(false)
	return enc.Encode(responses)
}

// decodeObject decodes a resource as Kubernetes' unstructured JSON decoding does: integers become
// int64 and other numbers float64 (both arrive in Lua as numbers).
func decodeObject(raw json.RawMessage) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var object map[string]any
	if err := dec.Decode(&object); err != nil {
		return nil, err
	}
	if object == nil {
		return nil, errors.New("not a JSON object")
	}
	return convertNumbers(object).(map[string]any), nil
}

func convertNumbers(value any) any {
	switch v := value.(type) {
	case map[string]any:
		for key, item := range v {
			v[key] = convertNumbers(item)
		}
	case []any:
		for i, item := range v {
			v[i] = convertNumbers(item)
		}
	case json.Number:
		if i, err := strconv.ParseInt(string(v), 10, 64); err == nil {
			return i
		}
		f, err := strconv.ParseFloat(string(v), 64)
		if err != nil {
			panic(err) // the JSON decoder only produces valid numbers
		}
		return f
	}
	return value
}

// toLua converts a decoded object to Lua values the way Argo CD does (util/lua/lua.go,
// decodeValue): maps become string-keyed tables, lists are appended in order (a nil element is
// dropped by LTable.Append, closing the gap), null is nil, numbers of every Go type are numbers.
func toLua(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case json.Number:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case int:
		return lua.LNumber(v)
	case int32:
		return lua.LNumber(v)
	case []any:
		table := l.CreateTable(len(v), 0)
		for _, item := range v {
			table.Append(toLua(l, item))
		}
		return table
	case map[string]any:
		table := l.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetH(lua.LString(key), toLua(l, item))
		}
		return table
	}
	return lua.LNil
}

// safeOsFuncs returns gopher-lua's os.time and os.date, the only two os functions Argo CD gives
// scripts (its oslib_safe.go is a copy of these two).
func safeOsFuncs() (map[string]lua.LGFunction, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	l.Push(l.NewFunction(lua.OpenOs))
	l.Push(lua.LString(lua.OsLibName))
	l.Call(1, 1)
	module, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return nil, errors.New("gopher-lua's os library did not return a table")
	}
	funcs := map[string]lua.LGFunction{}
	for _, name := range []string{"time", "date"} {
		fn, ok := module.RawGetString(name).(*lua.LFunction)
		if !ok || fn.GFunction == nil {
			return nil, fmt.Errorf("gopher-lua's os library has no Go function %s", name)
		}
		funcs[name] = fn.GFunction
	}
	return funcs, nil
}

// newState prepares a Lua state as Argo CD does for a health script.
func newState(useOpenLibs bool, safeOs map[string]lua.LGFunction) *lua.LState {
	l := lua.NewState(lua.Options{SkipOpenLibs: !useOpenLibs})
	openSafeOs := func(l *lua.LState) int {
		l.Push(l.RegisterModule(lua.OsLibName, safeOs))
		return 1
	}
	libs := []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.OsLibName, openSafeOs},
	}
	for _, lib := range libs {
		err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name))
		if err != nil {
			panic(err)
		}
	}
	l.PreloadModule(lua.OsLibName, func(l *lua.LState) int {
		l.Push(l.SetFuncs(l.NewTable(), safeOs))
		return 1
	})
	return l
}

// executeHealthLua runs script with obj set to object and reads the result as Argo CD's
// ExecuteHealthLua does.
func executeHealthLua(object map[string]any, script string, useOpenLibs bool, safeOs map[string]lua.LGFunction) (*healthStatus, error) {
	l := newState(useOpenLibs, safeOs)
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("actionParams", l.CreateTable(0, 0))
	l.SetGlobal("obj", toLua(l, object))

	fn, err := l.LoadString(script)
	if err == nil {
		l.Push(fn)
		err = l.PCall(0, lua.MultRet, nil)
	}
	if err != nil {
		// Argo CD drops the Lua stack trace from run-time errors before showing them.
		var apiErr *lua.ApiError
		if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
			apiErr.StackTrace = ""
			err = apiErr
		}
		return nil, err
	}

	returned := l.Get(-1)
	switch returned.Type() {
	case lua.LTNil:
		return &healthStatus{}, nil
	case lua.LTTable:
	default:
		return nil, fmt.Errorf("expect table output from Lua script, not %s", returned.Type())
	}
	encoded, err := luajson.Encode(returned)
	if err != nil {
		return nil, err
	}
	status := &healthStatus{}
	if err := json.Unmarshal(encoded, status); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return &healthStatus{}, nil
		}
		return nil, err
	}
	if !slices.Contains(healthStatuses, status.Status) {
		return &healthStatus{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return status, nil
}

// shownHealth is the health Argo CD shows for the object given what the script returned
// (gitops-engine's GetResourceHealth with the script as the health override).
func shownHealth(object map[string]any, result *healthStatus, err error) healthStatus {
	metadata, _ := object["metadata"].(map[string]any)
	if metadata["deletionTimestamp"] != nil && !hasHookFinalizer(metadata) {
		return healthStatus{Status: "Progressing", Message: "Pending deletion"}
	}
	if err != nil {
		return healthStatus{Status: "Unknown", Message: err.Error()}
	}
	return *result
}

func hasHookFinalizer(metadata map[string]any) bool {
	finalizers, _ := metadata["finalizers"].([]any)
	return slices.Contains(finalizers, any(hookFinalizer))
}
