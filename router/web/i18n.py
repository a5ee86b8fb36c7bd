"""The pages' words in English and Vietnamese, and which language a request gets.

The receive methods carry the customer's own names (their document calls them
"Web/Mobile App/SIP Phone", "Số điện thoại của Agent", "App" and "IP Phone"), each
with the sentence that says what rings.  A language chosen with the switch is kept
in a cookie; otherwise the browser's Accept-Language decides; otherwise English.
"""

from __future__ import annotations

from collections.abc import Mapping

LANGUAGES = ("en", "vi")
DEFAULT = "en"
COOKIE = "lang"

METHODS: dict[str, Mapping[str, tuple[str, str]]] = {
    # method -> language -> (name, what rings)
    "all_devices": {
        "en": ("Web/Mobile App/SIP Phone",
               "Everything you are logged in on rings: the web page, the app on your phone or tablet, "
               "and the IP phone (desk phone) connected to your account."),
        "vi": ("Web/Mobile App/SIP Phone",
               "Cuộc gọi đổ về trang web bạn đang đăng nhập, điện thoại hoặc tablet bạn đang đăng nhập, "
               "và IP phone (điện thoại bàn) đang kết nối với tài khoản của bạn."),
    },
    "app": {
        "en": ("App", "The web page and the app on your phone or tablet ring; the desk phone does not."),
        "vi": ("App", "Cuộc gọi đổ về trang web và điện thoại, tablet bạn đang đăng nhập; "
                      "điện thoại bàn không đổ chuông."),
    },
    "ip_phone": {
        "en": ("IP Phone", "Only the IP phone (desk phone) connected to your account rings."),
        "vi": ("IP Phone", "Cuộc gọi chỉ đổ về IP phone (điện thoại bàn) đang kết nối với tài khoản của bạn."),
    },
    "agent_phone": {
        "en": ("Agent phone number",
               "Your own phone number is called, from the hotline of the queue the customer called, "
               "so you see which line they called."),
        "vi": ("Số điện thoại của Agent",
               "Cuộc gọi đổ về số điện thoại Agent của bạn. Hệ thống gọi ra cho bạn từ số hotline "
               "của hàng đợi mà khách hàng đã gọi vào."),
    },
}

KINDS: dict[str, Mapping[str, str]] = {
    "web": {"en": "Web page", "vi": "Trang web"},
    "app": {"en": "App on a phone or tablet", "vi": "App trên điện thoại, tablet"},
    "ip_phone": {"en": "IP desk phone", "vi": "IP phone – điện thoại bàn"},
}

TEXTS: dict[str, tuple[str, str]] = {
    # key: (English, Vietnamese)
    "app_name": ("Call routing", "Định tuyến cuộc gọi"),
    "sp_title": ("This page is your web phone", "Trang này là điện thoại web của bạn"),
    "sp_connecting": ("Connecting…", "Đang kết nối…"),
    "sp_ready": ("Ready: calls for you ring on this page", "Sẵn sàng: cuộc gọi cho bạn đổ chuông tại trang này"),
    "sp_unavailable": ("Web phone unavailable", "Điện thoại web không dùng được"),
    "sp_incoming": ("Incoming call from", "Cuộc gọi đến từ"),
    "sp_in_call": ("In call with", "Đang gọi với"),
    "sp_queue": ("queue", "hàng đợi"),
    "sp_ended": ("Call ended", "Cuộc gọi đã kết thúc"),
    "sp_answer": ("Answer", "Trả lời"),
    "sp_decline": ("Decline", "Từ chối"),
    "sp_hangup": ("Hang up", "Gác máy"),
    "sp_no_jssip": ("the softphone library is not installed on the server",
                    "máy chủ chưa cài thư viện softphone"),
    "skip": ("Skip to the content", "Chuyển đến nội dung"),
    "nav_label": ("Main menu", "Menu chính"),
    "nav_me": ("How calls reach me", "Cách nhận cuộc gọi"),
    "nav_staff": ("Staff", "Quản lý nhân sự"),
    "nav_audit": ("Change log", "Nhật ký thay đổi"),
    "nav_calls": ("Calls", "Cuộc gọi"),
    "nav_password": ("Password", "Mật khẩu"),
    "logout": ("Log out", "Đăng xuất"),
    "signed_in": ("Signed in as", "Đang đăng nhập:"),     # read out before the name (hidden on screen)
    "language": ("Language", "Ngôn ngữ"),
    "role_admin": ("Admin", "Quản trị viên"),
    "role_agent": ("Agent", "Agent"),
    # login
    "login_title": ("Log in", "Đăng nhập"),
    "login_intro": ("Log in to choose how your calls reach you.",
                    "Đăng nhập để chọn cách bạn nhận cuộc gọi."),
    "user_id": ("User ID or extension", "Mã người dùng hoặc số máy lẻ"),
    "password": ("Password", "Mật khẩu"),
    "login_button": ("Log in", "Đăng nhập"),
    "login_failed": ("Wrong user ID or password.", "Sai mã người dùng hoặc mật khẩu."),
    "login_throttled": ("Too many failed attempts. Try again in {wait}.",
                        "Đăng nhập sai quá nhiều lần. Vui lòng thử lại sau {wait}."),
    "login_no_password": ("No password yet? Ask an admin to set one for you.",
                          "Chưa có mật khẩu? Hãy nhờ quản trị viên đặt mật khẩu cho bạn."),
    "login_expired": ("The login form expired. Please log in again.",
                      "Phiên đăng nhập đã hết hạn. Vui lòng đăng nhập lại."),
    "seconds": ("{n} seconds", "{n} giây"),
    "minutes": ("{n} minutes", "{n} phút"),
    # the agent page
    "me_title": ("How calls reach me", "Cách tôi nhận cuộc gọi"),
    "edit_title": ("How calls reach {name}", "Cách {name} nhận cuộc gọi"),
    "me_intro": ("Choose what rings when a call comes for you. A change applies to the next call.",
                 "Chọn nơi đổ chuông khi có cuộc gọi đến bạn. Thay đổi áp dụng ngay từ cuộc gọi tiếp theo."),
    "edit_intro": ("As an admin you may change how calls reach {name}. The change is recorded in the change log.",
                   "Với quyền quản trị viên, bạn có thể đổi cách {name} nhận cuộc gọi. "
                   "Thay đổi được ghi vào nhật ký."),
    "receive_method": ("Receive method", "Phương thức nhận cuộc gọi"),
    "current": ("current", "đang dùng"),
    "source_yaml": ("set in the configuration file", "đặt trong tệp cấu hình"),
    "source_runtime": ("changed here or by an operator", "đã được thay đổi tại đây hoặc bởi quản trị viên"),
    "agent_phone": ("Agent phone number", "Số điện thoại Agent"),
    "agent_phone_help": ("Written 84xxxxxxxxx: the country code, then the number without its leading 0.",
                         "Định dạng 84xxxxxxxxx: mã quốc gia, rồi số điện thoại bỏ số 0 ở đầu."),
    "phone_error_hint": ("This number is not written the way the system needs. Type {hint}.",
                         "Số điện thoại chưa đúng định dạng. Hãy nhập {hint}."),
    "phone_error_nohint": ("This is not a valid phone number. Write it as 84xxxxxxxxx.",
                           "Số điện thoại không hợp lệ. Hãy nhập theo dạng 84xxxxxxxxx."),
    "phone_needed": ("Type your agent phone number first: calls to your phone need it.",
                     "Hãy nhập số điện thoại Agent trước: cần có số để gọi ra cho bạn."),
    "method_error": ("This receive method cannot be used: {error}", "Không thể dùng phương thức này: {error}"),
    "fallback": ("If nobody answers", "Nếu không ai nghe máy"),
    "fallback_then": ("If nothing of that kind is logged in, or nobody answers in time, "
                      "the call goes on to: {methods}.",
                      "Nếu không có thiết bị nào đang đăng nhập, hoặc không ai nghe máy kịp, "
                      "cuộc gọi chuyển tiếp sang: {methods}."),
    "fallback_none": ("If nothing of that kind is logged in, or nobody answers in time, "
                      "the caller hears that you are unavailable.",
                      "Nếu không có thiết bị nào đang đăng nhập, hoặc không ai nghe máy kịp, "
                      "người gọi sẽ được báo là bạn không liên lạc được."),
    "fallback_admin": ("The fallback is set by an admin in the configuration.",
                       "Phương thức dự phòng do quản trị viên đặt trong cấu hình."),
    "save": ("Save", "Lưu"),
    "saved": ("Saved. Calls now reach you by: {method}.", "Đã lưu. Từ giờ cuộc gọi đến bạn qua: {method}."),
    "saved_other": ("Saved. Calls now reach {name} by: {method}.",
                    "Đã lưu. Từ giờ cuộc gọi đến {name} qua: {method}."),
    "unchanged": ("Nothing changed: these are already the settings in force.",
                  "Không có gì thay đổi: đây đã là cài đặt đang dùng."),
    "fix_below": ("Please correct the field marked below. Nothing was saved.",
                  "Vui lòng sửa ô được đánh dấu bên dưới. Chưa có gì được lưu."),
    "now_label": ("Right now:", "Lúc này:"),
    "now_rings": ("rings {devices}", "đổ chuông {devices}"),
    "now_nothing": ("nothing of this kind is logged in", "không có thiết bị nào loại này đang đăng nhập"),
    "now_phone": ("calls {number}", "gọi đến {number}"),
    "now_no_phone": ("no agent phone number yet", "chưa có số điện thoại Agent"),
    "now_cannot": ("not possible ({reason})", "không thực hiện được ({reason})"),
    # what would ring
    "preview_title": ("If a call came now", "Nếu có cuộc gọi lúc này"),
    "preview_queue": ("For a call through your queue {queue}.", "Với cuộc gọi qua hàng đợi {queue}."),
    "preview_ring": ("These ring together for {s} seconds; the first to answer takes the call.",
                     "Các thiết bị này đổ chuông cùng lúc trong {s} giây; thiết bị nghe máy đầu tiên nhận cuộc gọi."),
    "preview_ring_fallback": ("Nothing is logged in for {method}, so the fallback {fallback} rings these "
                              "for {s} seconds.",
                              "Không có thiết bị nào cho {method} đang đăng nhập, nên phương thức dự phòng "
                              "{fallback} đổ chuông các thiết bị này trong {s} giây."),
    "preview_phone": ("Your phone {number} is called from the hotline {hotline}.",
                      "Hệ thống gọi đến số {number} của bạn từ số hotline {hotline}."),
    "preview_phone_fallback": ("Nothing is logged in for {method}, so the fallback calls your phone {number} "
                               "from the hotline {hotline}.",
                               "Không có thiết bị nào cho {method} đang đăng nhập, nên hệ thống dự phòng "
                               "gọi đến số {number} từ số hotline {hotline}."),
    "preview_unavailable": ("Nothing would ring: the caller would hear that you are unavailable.",
                            "Không có gì đổ chuông: người gọi sẽ được báo là bạn không liên lạc được."),
    "preview_redirect": ("The PBX is given these contacts and rings them itself.",
                         "Tổng đài phía trước nhận danh sách này và tự đổ chuông."),
    "devices": ("Your devices", "Thiết bị của bạn"),
    "devices_of": ("Devices of {name}", "Thiết bị của {name}"),
    "device": ("Device", "Thiết bị"),
    "kind": ("Kind", "Loại"),
    "status": ("Would it ring?", "Có đổ chuông?"),
    "rings": ("Rings", "Đổ chuông"),
    "why_not_registered": ("No: not logged in now", "Không: hiện chưa đăng nhập"),
    "why_not_this_kind": ("No: {method} does not ring this kind", "Không: {method} không đổ chuông loại này"),
    "why_phone_number": ("No: your phone is called instead", "Không: gọi vào số của bạn"),
    "no_devices": ("No devices are set up for you. Ask an admin.",
                   "Bạn chưa có thiết bị nào. Hãy liên hệ quản trị viên."),
    "details": ("Technical details (as the router explains it)", "Chi tiết kỹ thuật (giải thích của hệ thống)"),
    # password
    "password_title": ("Change my password", "Đổi mật khẩu"),
    "password_current": ("Current password", "Mật khẩu hiện tại"),
    "password_new": ("New password", "Mật khẩu mới"),
    "password_again": ("New password again", "Nhập lại mật khẩu mới"),
    "password_help": ("At least {n} characters.", "Ít nhất {n} ký tự."),
    "password_wrong": ("The current password is wrong.", "Mật khẩu hiện tại không đúng."),
    "password_mismatch": ("The two new passwords differ.", "Hai mật khẩu mới không khớp nhau."),
    "password_weak": ("The new password needs at least {n} characters.", "Mật khẩu mới cần ít nhất {n} ký tự."),
    "password_saved": ("Password changed. Your other logins have been logged out.",
                       "Đã đổi mật khẩu. Các phiên đăng nhập khác đã bị đăng xuất."),
    "password_button": ("Change password", "Đổi mật khẩu"),
    # staff
    "staff_title": ("Staff", "Quản lý nhân sự"),
    "staff_intro": ("Everyone's receive method, where it comes from, and what is logged in now.",
                    "Phương thức nhận cuộc gọi của mọi người, nguồn cài đặt và các thiết bị đang đăng nhập."),
    "search": ("Search", "Tìm kiếm"),
    "search_placeholder": ("Name, ID, extension or phone", "Tên, mã, số máy lẻ hoặc số điện thoại"),
    "all_methods": ("All methods", "Tất cả phương thức"),
    "queue": ("Queue", "Hàng đợi"),
    "all_queues": ("All queues", "Tất cả hàng đợi"),
    "filter": ("Filter", "Lọc"),
    "clear": ("Clear", "Xóa bộ lọc"),
    "user": ("User", "Người dùng"),
    "role": ("Role", "Vai trò"),
    "method": ("Receive method", "Phương thức"),
    "devices_now": ("Logged in now", "Đang đăng nhập"),
    "last_change": ("Last change", "Thay đổi gần nhất"),
    "edit": ("Edit", "Sửa"),
    "edit_user": ("Edit {name}", "Sửa {name}"),
    "none": ("none", "không có"),
    "count_users": ("{n} of {total} users", "{n} / {total} người dùng"),
    "no_match": ("Nobody matches these filters.", "Không có ai phù hợp với bộ lọc."),
    "by_via": ("by {actor} via {via}", "bởi {actor} qua {via}"),
    "back_to_staff": ("Back to the staff list", "Quay lại danh sách nhân sự"),
    # audit
    "audit_title": ("Change log", "Nhật ký thay đổi"),
    "audit_intro": ("Every change made while the router runs: who, when, the old and new value, and through what.",
                    "Mọi thay đổi khi hệ thống đang chạy: ai, khi nào, giá trị cũ và mới, và thực hiện qua đâu."),
    "when": ("When", "Thời gian"),
    "field": ("Setting", "Mục"),
    "old": ("Old", "Cũ"),
    "new": ("New", "Mới"),
    "actor": ("Changed by", "Người thay đổi"),
    "via": ("Through", "Qua"),
    "everyone": ("Everyone", "Tất cả"),
    "any": ("Any", "Tất cả"),
    "no_changes": ("No changes yet.", "Chưa có thay đổi nào."),
    "field_receive_method": ("receive method", "phương thức nhận cuộc gọi"),
    "field_agent_phone": ("agent phone", "số điện thoại Agent"),
    "field_password_hash": ("password", "mật khẩu"),
    "via_api": ("web app / API", "ứng dụng web / API"),
    "via_cli": ("command line", "dòng lệnh"),
    # calls
    "calls_title": ("Calls", "Cuộc gọi"),
    "calls_live": ("In a call now", "Đang trong cuộc gọi"),
    "calls_live_note": ("Answered calls whose hang-up the router has not seen yet. A call that is still ringing "
                        "shows here only once it is answered.",
                        "Các cuộc gọi đã được nghe máy mà hệ thống chưa thấy kết thúc. Cuộc gọi đang đổ chuông "
                        "chỉ hiện ở đây sau khi được nghe máy."),
    "calls_recent": ("Recent calls", "Cuộc gọi gần đây"),
    "no_calls": ("No calls.", "Không có cuộc gọi nào."),
    "started": ("Started", "Bắt đầu"),
    "caller": ("Caller", "Người gọi"),
    "steps": ("Methods tried", "Phương thức đã thử"),
    "answered_by": ("Answered by", "Người nghe máy"),
    "result": ("Result", "Kết quả"),
    "duration": ("Duration", "Thời lượng"),
    "since": ("Since", "Từ lúc"),
    # errors
    "forbidden_title": ("Admins only", "Chỉ dành cho quản trị viên"),
    "forbidden_text": ("This page is for admins. You can change how your own calls reach you on your page.",
                       "Trang này chỉ dành cho quản trị viên. Bạn có thể đổi cách nhận cuộc gọi của mình "
                       "tại trang của bạn."),
    "not_found_title": ("Not found", "Không tìm thấy"),
    "csrf_title": ("This form has expired", "Biểu mẫu đã hết hạn"),
    "csrf_text": ("Reload the page and try again.", "Vui lòng tải lại trang và thử lại."),
    "error_title": ("Something went wrong", "Đã có lỗi xảy ra"),
    "go_to_my_page": ("Go to my page", "Đến trang của tôi"),
}


class Translator:
    def __init__(self, lang: str) -> None:
        self.lang = lang if lang in LANGUAGES else DEFAULT
        self._index = LANGUAGES.index(self.lang)

    def __call__(self, key: str, **values: object) -> str:
        pair = TEXTS.get(key)
        text = pair[self._index] if pair else key
        return text.format(**values) if values else text

    def method(self, method: str) -> str:
        entry = METHODS.get(method)
        return entry[self.lang][0] if entry else method

    def method_help(self, method: str) -> str:
        entry = METHODS.get(method)
        return entry[self.lang][1] if entry else ""

    def kind(self, kind: str) -> str:
        entry = KINDS.get(kind)
        return entry[self.lang] if entry else kind

    def wait(self, seconds: int) -> str:
        return self("seconds", n=seconds) if seconds < 120 else self("minutes", n=(seconds + 59) // 60)


def choose(cookie: str | None, accept_language: str | None) -> str:
    """The switch's choice, else the first supported language the browser asks for."""
    if cookie in LANGUAGES:
        return cookie
    best: tuple[float, int, str] | None = None
    for position, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        lang = tag.strip().lower().split("-")[0]
        if lang not in LANGUAGES:
            continue
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if weight > 0 and (best is None or (weight, -position) > (best[0], best[1])):
            best = (weight, -position, lang)
    return best[2] if best else DEFAULT
