#include "runtime/bootstrap.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "megamoe/error.h"

namespace megamoe::detail {
namespace {

using Clock = std::chrono::steady_clock;

std::string where(const RankEnv& env) {
  return "rank " + std::to_string(env.rank) + ": bootstrap " + env.master_addr + ":" +
         std::to_string(env.bootstrap_port);
}

class Socket {
 public:
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() { if (fd_ >= 0) ::close(fd_); }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  int fd() const { return fd_; }
 private:
  int fd_;
};

sockaddr_in resolve(const RankEnv& env) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(env.master_addr.c_str(), nullptr, &hints, &res);
  if (rc != 0 || !res) throw RuntimeError(where(env) + ": cannot resolve MASTER_ADDR: " + gai_strerror(rc));
  sockaddr_in addr = *reinterpret_cast<sockaddr_in*>(res->ai_addr);
  freeaddrinfo(res);
  addr.sin_port = htons(uint16_t(env.bootstrap_port));
  return addr;
}

// Sends or receives exactly n bytes before the deadline.
void transfer(const RankEnv& env, int fd, char* data, size_t n, bool sending, Clock::time_point deadline) {
  size_t done = 0;
  while (done < n) {
    int left_ms = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (left_ms <= 0) throw RuntimeError(where(env) + ": timed out during the transfer");
    pollfd p{fd, short(sending ? POLLOUT : POLLIN), 0};
    if (::poll(&p, 1, left_ms) <= 0) continue;
    ssize_t k = sending ? ::send(fd, data + done, n - done, MSG_NOSIGNAL) : ::recv(fd, data + done, n - done, 0);
    if (k == 0) throw RuntimeError(where(env) + ": peer closed the connection");
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      throw RuntimeError(where(env) + ": " + std::strerror(errno));
    }
    done += size_t(k);
  }
}

}  // namespace

int pick_free_port() {
  constexpr int kFirst = 20000, kCount = 12000;  // below Linux's default ephemeral range (32768-60999)
  const int start = int((uint64_t(::getpid()) * 7919u + uint64_t(std::chrono::steady_clock::now().time_since_epoch().count())) % kCount);
  for (int i = 0; i < kCount; i++) {
    const int port = kFirst + (start + i) % kCount;
    Socket s(::socket(AF_INET, SOCK_STREAM, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = htons(uint16_t(port));
    if (s.fd() >= 0 && ::bind(s.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return port;
  }
  throw RuntimeError(std::string("cannot find a free TCP port in [20000, 32000): ") + std::strerror(errno));
}

std::string tcp_broadcast_from_rank0(const RankEnv& env, const std::function<std::string()>& make_payload,
                                     double timeout_s) {
  if (env.world_size == 1) return make_payload();
  const auto deadline = Clock::now() + std::chrono::milliseconds(int64_t(timeout_s * 1000));
  sockaddr_in addr = resolve(env);
  if (env.rank == 0) {
    Socket listener(::socket(AF_INET, SOCK_STREAM, 0));
    int one = 1;
    ::setsockopt(listener.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in any = addr;
    any.sin_addr.s_addr = htonl(INADDR_ANY);
    if (::bind(listener.fd(), reinterpret_cast<sockaddr*>(&any), sizeof any) != 0 || ::listen(listener.fd(), 64) != 0)
      throw RuntimeError(where(env) + ": cannot listen: " + std::strerror(errno) +
                         " (set MEGAMOE_BOOTSTRAP_PORT to a free port)");
    const std::string payload = make_payload();
    const uint32_t size = htonl(uint32_t(payload.size()));
    for (int accepted = 1; accepted < env.world_size;) {
      int left_ms = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
      if (left_ms <= 0)
        throw RuntimeError(where(env) + ": only " + std::to_string(accepted - 1) + " of " +
                           std::to_string(env.world_size - 1) + " ranks connected before the timeout");
      pollfd p{listener.fd(), POLLIN, 0};
      if (::poll(&p, 1, left_ms) <= 0) continue;
      Socket peer(::accept(listener.fd(), nullptr, nullptr));
      if (peer.fd() < 0) continue;
      transfer(env, peer.fd(), const_cast<char*>(reinterpret_cast<const char*>(&size)), 4, true, deadline);
      transfer(env, peer.fd(), const_cast<char*>(payload.data()), payload.size(), true, deadline);
      char ack = 0;  // wait until the peer has read everything before closing
      transfer(env, peer.fd(), &ack, 1, false, deadline);
      accepted++;
    }
    return payload;
  }
  while (true) {
    Socket s(::socket(AF_INET, SOCK_STREAM, 0));
    if (::connect(s.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
      uint32_t size = 0;
      transfer(env, s.fd(), reinterpret_cast<char*>(&size), 4, false, deadline);
      std::string out(ntohl(size), '\0');
      transfer(env, s.fd(), out.data(), out.size(), false, deadline);
      char ack = 1;
      transfer(env, s.fd(), &ack, 1, true, deadline);
      return out;
    }
    if (Clock::now() > deadline)
      throw RuntimeError(where(env) + ": rank 0 did not answer within " + std::to_string(int(timeout_s)) + " s (" +
                         std::strerror(errno) + ")");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

}  // namespace megamoe::detail
