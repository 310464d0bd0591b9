// A Go host app (standard library only) whose users pay for AI answers with their own Quota
// wallet, through quota-sidecar.
//
// The app keeps its own sign-in (an HMAC-signed cookie) and adds two things for the sidecar:
//
//  1. GET /quota/whoami answers 200 with the X-Quota-User header when the cookie belongs to a
//     signed-in user, 401 otherwise. The sidecar calls it with the browser's cookie to learn who
//     is connecting a wallet.
//  2. Its AI calls go to the sidecar's internal listener, OpenAI-compatible, with the user named
//     in X-Quota-User. The sidecar adds that user's Quota token.
//
// The browser side is a link to /auth/quota/connect and fetch calls to /auth/quota/status,
// /balance and /disconnect, which the sidecar answers in front of this app.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"embed"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"
)

const (
	cookieName      = "go_user"
	maxNameChars    = 64
	maxMessageChars = 4000
	maxErrorBody    = 64 << 10
)

//go:embed static
var staticFiles embed.FS

type app struct {
	chatURL        string
	apiKey         string
	identityHeader string
	model          string
	cookieKey      []byte
	http           *http.Client
	page           *template.Template
}

func env(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

func main() {
	secret := os.Getenv("COOKIE_SECRET")
	if secret == "" {
		random := make([]byte, 32)
		if _, err := rand.Read(random); err != nil {
			log.Fatal(err)
		}
		secret = hex.EncodeToString(random)
		log.Print("COOKIE_SECRET is not set: using a random one, so sign-ins end when the app restarts")
	}
	sidecar := strings.TrimRight(env("SIDECAR_INTERNAL_URL", "http://127.0.0.1:8081"), "/")
	a := &app{
		chatURL:        sidecar + "/v1/chat/completions",
		apiKey:         os.Getenv("SIDECAR_INTERNAL_API_KEY"),
		identityHeader: env("IDENTITY_HEADER", "X-Quota-User"),
		model:          env("CHAT_MODEL", "gpt-4o-mini"),
		cookieKey:      []byte(secret),
		// No overall timeout: an answer may stream for minutes. The sidecar is local, so a
		// connection or a first byte that takes this long means it is down.
		http: &http.Client{Transport: &http.Transport{
			DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			ResponseHeaderTimeout: 120 * time.Second,
		}},
		page: template.Must(template.New("page").Parse(pageHTML)),
	}

	static, err := fs.Sub(staticFiles, "static")
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/app.js", http.FileServer(http.FS(static)))
	mux.Handle("/app.css", http.FileServer(http.FS(static)))
	mux.HandleFunc("/quota/whoami", a.whoami)
	mux.HandleFunc("/api/chat", a.chat)
	mux.HandleFunc("/login", a.login)
	mux.HandleFunc("/logout", a.logout)
	mux.HandleFunc("/", a.index)

	address := net.JoinHostPort(env("HOST", "127.0.0.1"), env("PORT", "3000"))
	server := &http.Server{
		Addr:              address,
		Handler:           refuseCrossSitePosts(mux),
		ReadHeaderTimeout: 10 * time.Second,
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = server.Shutdown(shutdown)
	}()
	log.Printf("Go example on http://%s (sidecar internal listener: %s)", address, sidecar)
	if err := server.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}

// --- the identity endpoint the sidecar probes -----------------------------------------------

func (a *app) whoami(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	name, ok := a.signedInUser(r)
	if !ok {
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "not_signed_in"})
		return
	}
	w.Header().Set(a.identityHeader, userID(name))
	writeJSON(w, http.StatusOK, map[string]string{"user": name})
}

// userID is what the identity header carries: visible ASCII, so the name is percent-encoded.
// A real app sends its own stable user id here.
func userID(name string) string {
	return url.PathEscape(name)
}

// --- AI calls through the sidecar -----------------------------------------------------------

type chatChunk struct {
	Choices []struct {
		Delta struct {
			Content string `json:"content"`
		} `json:"delta"`
	} `json:"choices"`
}

type apiError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func (a *app) chat(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		writeError(w, http.StatusMethodNotAllowed, "method_not_allowed", "POST only.")
		return
	}
	name, ok := a.signedInUser(r)
	if !ok {
		writeError(w, http.StatusUnauthorized, "not_signed_in", "Sign in first.")
		return
	}
	var in struct {
		Message string `json:"message"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 32<<10)).Decode(&in); err != nil ||
		strings.TrimSpace(in.Message) == "" || utf8.RuneCountInString(in.Message) > maxMessageChars {
		writeError(w, http.StatusBadRequest, "invalid_message",
			fmt.Sprintf(`Send JSON {"message": "..."} with 1 to %d characters.`, maxMessageChars))
		return
	}
	body, _ := json.Marshal(map[string]any{
		"model":    a.model,
		"messages": []map[string]string{{"role": "user", "content": strings.TrimSpace(in.Message)}},
		"stream":   true,
	})
	// The browser's context: a browser that leaves cancels the call to the sidecar and Quota.
	req, err := http.NewRequestWithContext(r.Context(), http.MethodPost, a.chatURL, bytes.NewReader(body))
	if err != nil {
		writeError(w, http.StatusInternalServerError, "internal_error", "Could not build the request.")
		return
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set(a.identityHeader, userID(name))
	if a.apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+a.apiKey)
	}
	resp, err := a.http.Do(req)
	if err != nil {
		log.Printf("sidecar unreachable: %v", err)
		writeError(w, http.StatusBadGateway, "sidecar_unavailable", "The Quota wallet connector is not reachable.")
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		relayError(w, resp)
		return
	}
	relayAnswer(w, resp.Body)
}

// relayError hands the sidecar's (or Quota's) error to the browser with its status and code:
// wallet_not_connected, insufficient_credits, ...; the page turns the code into words.
func relayError(w http.ResponseWriter, resp *http.Response) {
	var parsed apiError
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	if json.Unmarshal(raw, &parsed) != nil || parsed.Error.Code == "" {
		parsed.Error.Code = "sidecar_error"
		parsed.Error.Message = fmt.Sprintf("The wallet connector answered HTTP %d.", resp.StatusCode)
	}
	writeError(w, resp.StatusCode, parsed.Error.Code, parsed.Error.Message)
}

// relayAnswer reads the OpenAI-style SSE stream and writes each piece of text to the browser
// as soon as it arrives.
func relayAnswer(w http.ResponseWriter, stream io.Reader) {
	flusher, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	lines := bufio.NewScanner(stream)
	lines.Buffer(make([]byte, 64<<10), 1<<20)
	for lines.Scan() {
		line := lines.Text()
		if !strings.HasPrefix(line, "data:") {
			continue
		}
		data := strings.TrimSpace(strings.TrimPrefix(line, "data:"))
		if data == "[DONE]" {
			return
		}
		var chunk chatChunk
		if json.Unmarshal([]byte(data), &chunk) != nil || len(chunk.Choices) == 0 {
			continue
		}
		if text := chunk.Choices[0].Delta.Content; text != "" {
			_, _ = io.WriteString(w, text)
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
	if err := lines.Err(); err != nil {
		log.Printf("answer stream cut off: %v", err)
		_, _ = io.WriteString(w, "\n[The answer was cut off before it finished.]")
	}
}

// --- the app's own sign-in ------------------------------------------------------------------

func validName(name string) bool {
	n := utf8.RuneCountInString(name)
	if n < 1 || n > maxNameChars || !utf8.ValidString(name) {
		return false
	}
	for _, r := range name {
		if unicode.IsControl(r) {
			return false
		}
	}
	return true
}

func (a *app) mac(payload string) string {
	h := hmac.New(sha256.New, a.cookieKey)
	h.Write([]byte(payload))
	return base64.RawURLEncoding.EncodeToString(h.Sum(nil))
}

func (a *app) seal(name string) string {
	payload := base64.RawURLEncoding.EncodeToString([]byte(name))
	return payload + "." + a.mac(payload)
}

func (a *app) signedInUser(r *http.Request) (string, bool) {
	cookie, err := r.Cookie(cookieName)
	if err != nil {
		return "", false
	}
	payload, mac, found := strings.Cut(cookie.Value, ".")
	if !found || !hmac.Equal([]byte(mac), []byte(a.mac(payload))) {
		return "", false
	}
	raw, err := base64.RawURLEncoding.DecodeString(payload)
	if err != nil || !validName(string(raw)) {
		return "", false
	}
	return string(raw), true
}

func (a *app) login(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		writeError(w, http.StatusMethodNotAllowed, "method_not_allowed", "POST only.")
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 4<<10)
	name := strings.TrimSpace(r.PostFormValue("name"))
	if !validName(name) {
		http.Redirect(w, r, "/?signin_error=invalid_name", http.StatusSeeOther)
		return
	}
	http.SetCookie(w, &http.Cookie{
		Name: cookieName, Value: a.seal(name), Path: "/",
		HttpOnly: true, SameSite: http.SameSiteLaxMode, Secure: r.TLS != nil,
	})
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

func (a *app) logout(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		writeError(w, http.StatusMethodNotAllowed, "method_not_allowed", "POST only.")
		return
	}
	http.SetCookie(w, &http.Cookie{
		Name: cookieName, Value: "", Path: "/", MaxAge: -1,
		HttpOnly: true, SameSite: http.SameSiteLaxMode,
	})
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

func (a *app) index(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		http.NotFound(w, r)
		return
	}
	name, signedIn := a.signedInUser(r)
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Security-Policy", "default-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Type", "text/html; charset=utf-8")
	data := struct {
		User       string
		SignedIn   bool
		MaxName    int
		MaxMessage int
	}{name, signedIn, maxNameChars, maxMessageChars}
	if err := a.page.Execute(w, data); err != nil {
		log.Printf("page: %v", err)
	}
}

// SameSite=Lax keeps the cookie off cross-site POSTs; this also refuses login CSRF.
func refuseCrossSitePosts(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.Header.Get("Sec-Fetch-Site") == "cross-site" {
			writeError(w, http.StatusForbidden, "forbidden_origin", "Cross-site requests are not accepted.")
			return
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

func writeError(w http.ResponseWriter, status int, code, message string) {
	writeJSON(w, status, map[string]map[string]string{
		"error": {"code": code, "message": message, "type": "go_app_error"},
	})
}

const pageHTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Go + Quota wallet</title>
<link rel="stylesheet" href="/app.css">
</head>
<body>
<header class="topbar">
  <span class="brand">Go Notes</span>
  {{if .SignedIn}}<span class="account">Signed in as <strong id="user-name">{{.User}}</strong>
  <form method="post" action="/logout"><button class="link" type="submit">Sign out</button></form></span>{{end}}
</header>
<main>
  <div id="error" class="banner" role="alert" hidden></div>
{{if .SignedIn}}
  <section class="card row" data-signed-in>
    <div>
      <h2>Quota wallet</h2>
      <p id="status" class="muted">Checking your Quota wallet…</p>
    </div>
    <div class="actions">
      <span id="balance" class="pill" hidden></span>
      <a id="connect" class="button" href="/auth/quota/connect?return_to=/" hidden>Connect Quota Wallet</a>
      <button id="disconnect" class="secondary" type="button" hidden>Disconnect</button>
    </div>
  </section>
  <section class="card">
    <h2>Ask the assistant</h2>
    <form id="chat-form" class="stack">
      <label for="chat-input">Your question</label>
      <textarea id="chat-input" rows="3" maxlength="{{.MaxMessage}}" required></textarea>
      <button id="chat-send" type="submit">Send</button>
    </form>
    <div id="chat-output" class="output" aria-live="polite"></div>
  </section>
{{else}}
  <section class="card">
    <h1>Sign in</h1>
    <p class="muted">Any name will do: this example has no passwords.</p>
    <form method="post" action="/login" class="stack">
      <label for="signin-name">Your name</label>
      <input id="signin-name" name="name" maxlength="{{.MaxName}}" required autocomplete="username">
      <button id="signin" type="submit">Sign in</button>
    </form>
  </section>
{{end}}
</main>
<footer>A Go app behind quota-sidecar: answers are paid from each user's own Quota wallet.</footer>
<script src="/app.js"></script>
</body>
</html>
`
